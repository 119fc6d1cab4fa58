//! Batched merges (`Memory::merge_batch`), really remapped: random batches
//! of runs and single pages interleaved with guest writes through the
//! mapping (copy-on-write breaks inside merged runs), single merges,
//! migrations, compactions and rebuilds, without and under a budget of
//! kernel mappings, keep `verify()`, every frame's content and each VM's
//! mappings within its cap and reserve; real
//! guests that write all the time lose no write while batches merge their
//! memory; and a batch of consecutive frames onto consecutive kept pages
//! adds a handful of kernel mappings (VMAs), not one per page, and an idle
//! VM's zero pages are released to the host without adding any.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{guest_read, guest_write, micro_vm_on_space};
use disco::faults::FaultHandler;
use disco::guest::{layout, Workload};
use disco::kvm_check::require_kvm;
use disco::memory::{Memory, MergeOutcome, MergePair, VmId};
use disco::sharing::{ScanState, ScannerConfig};
use disco::PAGE_SIZE;

/// The pairs that merge frames `dup_first..+len` of `dup` onto
/// `keep_first..+len` of `keep` (clamped to `frames`), with the pages they
/// map now.
fn run_pairs(
    memory: &Memory,
    dup: (VmId, u64),
    keep: (VmId, u64),
    len: u64,
    frames: u64,
) -> Vec<MergePair> {
    (0..len)
        .map(|i| (dup.1 + i, keep.1 + i))
        .take_while(|&(d, k)| d < frames && k < frames)
        .filter_map(|(d, k)| {
            let dup_page = memory.lookup(dup.0, d).unwrap()?.page;
            let keep_page = memory.lookup(keep.0, k).unwrap()?.page;
            Some(MergePair {
                dup_gfn: d,
                dup_page,
                keep: (keep.0, k, keep_page),
            })
        })
        .collect()
}

#[test]
fn random_batches_writes_migrations_and_rebuilds_keep_contents() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const VMS: usize = 3;
    const FRAMES: u64 = 40;
    const NODES: usize = 2;
    #[derive(Clone, Debug)]
    enum Op {
        /// A store through the guest mapping (values 0..3: duplicates abound).
        Write {
            vm: usize,
            gfn: u64,
            value: u8,
        },
        /// One batch of `dup`'s frames: runs `(dup first, keep first, len)`
        /// onto frames of `keep` (len 1: single pages). `stale`: the first
        /// pair names a page the frame does not map.
        Batch {
            dup: usize,
            keep: usize,
            runs: Vec<(u64, u64, u64)>,
            stale: bool,
        },
        Single {
            dup: usize,
            dgfn: u64,
            keep: usize,
            kgfn: u64,
        },
        MoveBatch {
            vm: usize,
            first: u64,
            len: u64,
            node: usize,
        },
        Rebuild {
            vm: usize,
            node: usize,
        },
        /// `Memory::compact` of frames `first..first+len` of `vm`.
        Compact {
            vm: usize,
            first: u64,
            len: u64,
        },
    }
    let op = prop_oneof![
        5 => (0..VMS, 0..FRAMES, 0u8..3).prop_map(|(vm, gfn, value)| Op::Write { vm, gfn, value }),
        4 => (0..VMS, 0..VMS, proptest::collection::vec((0..FRAMES, 0..FRAMES, 1..12u64), 1..4), proptest::bool::weighted(0.2))
            .prop_map(|(dup, keep, runs, stale)| Op::Batch { dup, keep, runs, stale }),
        1 => (0..VMS, 0..FRAMES, 0..VMS, 0..FRAMES)
            .prop_map(|(dup, dgfn, keep, kgfn)| Op::Single { dup, dgfn, keep, kgfn }),
        1 => (0..VMS, 0..FRAMES, 1..FRAMES, 0..NODES)
            .prop_map(|(vm, first, len, node)| Op::MoveBatch { vm, first, len, node }),
        1 => (0..VMS, 0..NODES).prop_map(|(vm, node)| Op::Rebuild { vm, node }),
        2 => (0..VMS, 0..FRAMES, 2..FRAMES)
            .prop_map(|(vm, first, len)| Op::Compact { vm, first, len }),
    ];
    // Without a budget, and with one that binds (16 mappings for 40
    // frames: single merges and breaks reach it).
    let budget = prop_oneof![Just(0u64), Just(8u64)];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    // What the budget did over all cases: each mechanism must have run.
    let totals = std::sync::Mutex::new(disco::memory::BudgetStats::default());
    runner
        .run(
            &(proptest::collection::vec(op, 1..50), budget),
            |(ops, per)| {
                let pages = (VMS as u64 * FRAMES * 2) as u32;
                let memory = Arc::new(Memory::new(&[(0, 0, pages), (1, 0, pages)]).unwrap());
                memory.set_frames_per_mapping(per).unwrap();
                let handler = FaultHandler::start(memory.clone()).unwrap();
                let mut spaces: Vec<(VmId, usize)> = (0..VMS)
                    .map(|v| {
                        memory
                            .create_space(&format!("p{v}"), FRAMES, v % NODES)
                            .unwrap()
                    })
                    .collect();
                // Model: the value each frame is filled with (0: never written).
                let mut model: Vec<BTreeMap<u64, u8>> = vec![BTreeMap::new(); VMS];
                let value = |model: &[BTreeMap<u64, u8>], vm: usize, gfn: u64| {
                    model[vm].get(&gfn).copied().unwrap_or(0)
                };
                for op in ops {
                    match op {
                        Op::Write { vm, gfn, value } => {
                            guest_write(spaces[vm].1, gfn, value);
                            model[vm].insert(gfn, value);
                        }
                        Op::Batch {
                            dup,
                            keep,
                            runs,
                            stale,
                        } => {
                            let mut pairs = Vec::new();
                            for (d, k, len) in runs {
                                let room = 512 - pairs.len() as u64;
                                let run = run_pairs(
                                    &memory,
                                    (spaces[dup].0, d),
                                    (spaces[keep].0, k),
                                    len.min(room),
                                    FRAMES,
                                );
                                pairs.extend(run);
                            }
                            if stale {
                                pairs[0].dup_page.index ^= 1 << 20;
                            }
                            let outcomes = memory.merge_batch(spaces[dup].0, &pairs).unwrap();
                            prop_assert_eq!(outcomes.len(), pairs.len());
                            let mut seen = std::collections::HashSet::new();
                            for (i, (p, o)) in pairs.iter().zip(&outcomes).enumerate() {
                                let (kv, kg, _) = p.keep;
                                let kvm = spaces.iter().position(|s| s.0 == kv).unwrap();
                                let same = value(&model, dup, p.dup_gfn) == value(&model, kvm, kg);
                                let first_time = seen.insert(p.dup_gfn);
                                if stale && i == 0 {
                                    prop_assert_eq!(*o, MergeOutcome::Stale);
                                }
                                match o {
                                    MergeOutcome::Merged => {
                                        prop_assert!(same, "pair {:?} merged different content", p);
                                        prop_assert!(first_time);
                                    }
                                    MergeOutcome::Differ => {
                                        prop_assert!(!same, "equal pair {:?} differs", p)
                                    }
                                    MergeOutcome::Stale | MergeOutcome::Deferred => {}
                                }
                            }
                            // A merged duplicate maps its kept page (a kept
                            // frame is never a duplicate of the same batch).
                            for (p, o) in pairs.iter().zip(&outcomes) {
                                if *o == MergeOutcome::Merged {
                                    let now =
                                        memory.lookup(spaces[dup].0, p.dup_gfn).unwrap().unwrap();
                                    prop_assert_eq!(now.page, p.keep.2);
                                    prop_assert!(now.flags.write_protected);
                                }
                            }
                        }
                        Op::Single {
                            dup,
                            dgfn,
                            keep,
                            kgfn,
                        } => {
                            let d = memory.lookup(spaces[dup].0, dgfn).unwrap().unwrap().page;
                            let k = memory.lookup(spaces[keep].0, kgfn).unwrap().unwrap().page;
                            let o = memory
                                .merge((spaces[dup].0, dgfn, d), (spaces[keep].0, kgfn, k))
                                .unwrap();
                            let same = value(&model, dup, dgfn) == value(&model, keep, kgfn);
                            prop_assert!(o != MergeOutcome::Merged || same);
                            prop_assert!(o != MergeOutcome::Differ || !same);
                        }
                        Op::MoveBatch {
                            vm,
                            first,
                            len,
                            node,
                        } => {
                            let gfns: Vec<u64> = (first..(first + len).min(FRAMES)).collect();
                            let report = memory.move_pages(spaces[vm].0, &gfns, node).unwrap();
                            // Only the budget may hold a migration back.
                            prop_assert!(
                                report
                                    .failed
                                    .iter()
                                    .all(|(_, why)| per > 0 && why.starts_with("deferred")),
                                "{:?}",
                                report.failed
                            );
                        }
                        Op::Compact { vm, first, len } => {
                            let end = (first + len).min(FRAMES);
                            let before = memory.space_mappings(spaces[vm].0).unwrap().0;
                            let saved = memory.compact(spaces[vm].0, first..end).unwrap();
                            let after = memory.space_mappings(spaces[vm].0).unwrap().0;
                            if let Some(saved) = saved {
                                prop_assert!(
                                    saved > 0 && after < before,
                                    "a compaction saves: {} -> {}",
                                    before,
                                    after
                                );
                            } else {
                                prop_assert_eq!(
                                    before,
                                    after,
                                    "a refused compaction changes nothing"
                                );
                            }
                        }
                        Op::Rebuild { vm, node } => {
                            memory.destroy_space(spaces[vm].0).unwrap();
                            spaces[vm] = memory.create_space("again", FRAMES, node).unwrap();
                            model[vm].clear();
                        }
                    }
                    memory
                        .verify()
                        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                    for &(id, base) in &spaces {
                        // The pmap's count is the kernel's (verify) and this
                        // test's own count of /proc/self/maps agrees.
                        let (mappings, cap) = memory.space_mappings(id).unwrap();
                        prop_assert_eq!(vma_count_overlapping(base, FRAMES) as u64, mappings);
                        if let Some(cap) = cap {
                            let bound = cap + disco::memory::budget::overrun_reserve(FRAMES);
                            prop_assert!(
                                mappings <= bound,
                                "{} mappings, cap {} + reserve",
                                mappings,
                                cap
                            );
                        }
                    }
                    for (v, &(id, base)) in spaces.iter().enumerate() {
                        for gfn in 0..FRAMES {
                            let want = value(&model, v, gfn);
                            let page = memory.read_guest_page(id, gfn).unwrap();
                            prop_assert!(
                                page.iter().all(|&x| x == want),
                                "vm {} frame {} lost its content",
                                v,
                                gfn
                            );
                            prop_assert_eq!(
                                guest_read(base, gfn),
                                page,
                                "the guest sees its frame"
                            );
                        }
                    }
                }
                let used = common::destroy_all(&memory, spaces.into_iter().map(|(id, _)| id))
                    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(used, 0, "no machine page leaked");
                drop(handler);
                let b = memory.budget_stats();
                let mut t = totals.lock().unwrap();
                t.compactions += b.compactions;
                t.breaks_joined += b.breaks_joined;
                t.unit_breaks += b.unit_breaks;
                t.deferred_merge_runs += b.deferred_merge_runs;
                t.deferred_moves += b.deferred_moves;
                Ok(())
            },
        )
        .unwrap();
    let t = totals.into_inner().unwrap();
    eprintln!("budget over all cases: {t:?}");
    assert!(
        t.compactions > 0 && t.breaks_joined > 0 && t.unit_breaks > 0 && t.deferred_merge_runs > 0,
        "every budget mechanism ran: {t:?}"
    );
}

/// Kernel mappings (lines of `/proc/self/maps`) that start inside the
/// guest mapping of `frames` frames at `base`: only this space's, so tests
/// running in parallel in this process do not change the count.
fn vma_count(base: usize, frames: u64) -> usize {
    let end = base + frames as usize * PAGE_SIZE;
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let start = l.split('-').next().unwrap();
            let start = usize::from_str_radix(start, 16).unwrap();
            (base..end).contains(&start)
        })
        .count()
}

/// Kernel mappings that overlap the guest mapping of `frames` frames at
/// `base` (a hole at its start may have joined a hole before it).
fn vma_count_overlapping(base: usize, frames: u64) -> usize {
    let end = base + frames as usize * PAGE_SIZE;
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (
                usize::from_str_radix(s, 16).unwrap(),
                usize::from_str_radix(e, 16).unwrap(),
            );
            s < end && e > base
        })
        .count()
}

/// Two spaces with the same distinct content in every frame (`seed` makes
/// each pair of spaces differ from the others).
/// Returns both and the base address of the second's guest mapping.
fn twin_spaces(memory: &Memory, frames: u64, seed: u8) -> (VmId, VmId, usize) {
    let (a, _) = memory.create_space("a", frames, 0).unwrap();
    let (b, base_b) = memory.create_space("b", frames, 0).unwrap();
    for gfn in 0..frames {
        let mut page = vec![seed; PAGE_SIZE];
        page[..8].copy_from_slice(&gfn.to_le_bytes());
        memory.write_guest_page(a, gfn, &page).unwrap();
        memory.write_guest_page(b, gfn, &page).unwrap();
    }
    (a, b, base_b)
}

#[test]
fn a_batch_of_a_run_adds_a_handful_of_mappings_not_one_per_page() {
    const N: u64 = 512;
    let memory = Memory::new(&[(0, 0, 8 * N as u32)]).unwrap();
    assert!(
        memory.userfault().is_some(),
        "merges need userfaultfd write-protect (run the tests as root)"
    );
    let (a, b, base_b) = twin_spaces(&memory, N, 1);
    let before = vma_count(base_b, N);
    let pairs = run_pairs(&memory, (b, 0), (a, 0), N, N);
    let outcomes = memory.merge_batch(b, &pairs).unwrap();
    assert!(outcomes.iter().all(|&o| o == MergeOutcome::Merged));
    let batched = vma_count(base_b, N) as i64 - before as i64;
    memory.verify().unwrap();
    assert_eq!(memory.sharing_stats().saved_pages, N);

    // The same frames merged one page at a time, every other frame first
    // (as a scan that finds them out of order would): each lands in a
    // mapping of its own between its unmerged neighbours. (Once the gaps
    // are merged too, the kernel joins the neighbouring mappings again:
    // consecutive frames onto consecutive pages of one file.)
    let (c, d, base_d) = twin_spaces(&memory, N, 2);
    let before = vma_count(base_d, N);
    let mut single = 0;
    for gfn in (0..N).step_by(2).chain((1..N).step_by(2)) {
        if gfn == 1 {
            single = vma_count(base_d, N) as i64 - before as i64;
        }
        let dp = memory.lookup(d, gfn).unwrap().unwrap().page;
        let cp = memory.lookup(c, gfn).unwrap().unwrap().page;
        assert_eq!(
            memory.merge((d, gfn, dp), (c, gfn, cp)).unwrap(),
            MergeOutcome::Merged
        );
    }
    let joined = vma_count(base_d, N) as i64 - before as i64;
    memory.verify().unwrap();
    eprintln!(
        "VMAs added by merging {N} frames: in one batch {batched}; one at a time, \
         every other frame {single}, then the rest {joined}"
    );
    assert!(
        batched <= 4,
        "a run merged in one batch adds a handful of VMAs: {batched}"
    );
    assert!(
        single >= N as i64 / 2,
        "every other frame merged alone is a mapping each: {single}"
    );
}

/// An idle VM whose memory its kernel zeroed (resident zero pages, plus a
/// few pages of data): the scanner releases every zero page to the host
/// (punched out of the pool in place) and adds no kernel mapping; reads of
/// a released frame see zeros, a write lands, and the scanner notices the
/// frames the guest touched again.
#[test]
fn an_idle_vms_zero_pages_are_released_without_a_mapping() {
    const N: u64 = 1024;
    const DATA: u64 = 8;
    let memory = Arc::new(Memory::new(&[(0, 0, 2 * N as u32)]).unwrap());
    let _handler = FaultHandler::start(memory.clone())
        .expect("releases need userfaultfd write-protect (run the tests as root)");
    let (vm, base) = memory.create_space("idle", N, 0).unwrap();
    for gfn in 0..N {
        let mut page = vec![0u8; PAGE_SIZE];
        if gfn % (N / DATA) == 0 {
            page[..8].copy_from_slice(&(gfn + 1).to_le_bytes());
        }
        memory.write_guest_page(vm, gfn, &page).unwrap();
    }
    let resident = || memory.pool_stats()[0].resident_bytes / PAGE_SIZE as u64;
    let (vmas, resident_before) = (vma_count(base, N), resident());
    assert!(
        resident_before >= N,
        "every page written: {resident_before}"
    );

    let mut scanner = ScanState::new(ScannerConfig::new(u64::MAX, vec![]).without_time_rules());
    while scanner.stats.full_scans < 3 {
        scanner.step(&memory, 256);
    }
    memory.verify().unwrap();
    let stats = memory.sharing_stats();
    assert_eq!(scanner.stats.zero_releases, N - DATA, "{:?}", scanner.stats);
    assert_eq!(stats.released_zero_frames, N - DATA);
    assert_eq!(stats.saved_pages, 0, "nothing shared");
    assert_eq!(vma_count(base, N), vmas, "releases add no kernel mapping");
    assert!(
        resident() + (N - DATA) <= resident_before,
        "the host got the pages back: {} of {resident_before} resident",
        resident()
    );

    // A read of a released frame sees zeros; a write lands.
    assert!(guest_read(base, 1).iter().all(|&b| b == 0));
    guest_write(base, 2, 0x5a);
    assert!(memory
        .read_guest_page(vm, 2)
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    assert!(memory.read_guest_page(vm, 0).unwrap()[..8] == 1u64.to_le_bytes());
    memory.verify().unwrap();
    let before = scanner.stats.full_scans;
    while scanner.stats.full_scans < before + 2 {
        scanner.step(&memory, 256);
    }
    // Frame 1 (read: a zero page again, released again by now), frame 2
    // (written: data), the rest still released.
    let stats = memory.sharing_stats();
    assert_eq!(stats.released_zero_frames, N - DATA - 1, "{stats:?}");
    assert_eq!(vma_count(base, N), vmas);
    memory.verify().unwrap();
    memory.destroy_space(vm).unwrap();
    assert_eq!(memory.pool_stats()[0].used_pages, 0, "no page leaked");
}

/// Two spaces whose first half is equal only at every other frame (shared
/// pages scattered among private ones: every merge its own mapping) and
/// whose second half is equal throughout. With a budget of one mapping per
/// 64 frames the scanner spends it on the longest runs: the second half
/// merges whole, the scattered half only while the budget lasts, and the
/// duplicate space stays near its budget; without a budget the scattered
/// half costs a mapping per merged page.
#[test]
fn the_mapping_budget_goes_to_the_longest_runs() {
    const N: u64 = 4096;
    let scan = |frames_per_mapping: u64| {
        let memory = Arc::new(Memory::new(&[(0, 0, 3 * N as u32)]).unwrap());
        let _handler = FaultHandler::start(memory.clone())
            .expect("merges need userfaultfd write-protect (run the tests as root)");
        let (a, _) = memory.create_space("a", N, 0).unwrap();
        let (b, base_b) = memory.create_space("b", N, 0).unwrap();
        for gfn in 0..N {
            let mut page = vec![7u8; PAGE_SIZE];
            page[..8].copy_from_slice(&gfn.to_le_bytes());
            memory.write_guest_page(a, gfn, &page).unwrap();
            if gfn < N / 2 && gfn % 2 == 1 {
                page[8] = 1; // private to b
            }
            memory.write_guest_page(b, gfn, &page).unwrap();
        }
        let mut config = ScannerConfig::new(u64::MAX, vec![]).without_time_rules();
        config.frames_per_mapping = frames_per_mapping;
        let mut scanner = ScanState::new(config);
        while scanner.stats.full_scans < 4 {
            scanner.step(&memory, 512);
        }
        memory.verify().unwrap();
        let saved = memory.sharing_stats().saved_pages;
        let vmas = vma_count(base_b, N) as u64;
        let deferred = scanner.stats.budget_deferrals;
        (saved, vmas, deferred)
    };
    let (saved, vmas, deferred) = scan(64);
    let (all_saved, all_vmas, none_deferred) = scan(0);
    eprintln!(
        "budget 1 per 64 frames: saved {saved} pages, {vmas} mappings, {deferred} deferrals; \
         no budget: saved {all_saved}, {all_vmas} mappings"
    );
    let budget = N / 64;
    assert_eq!(
        all_saved,
        N / 2 + N / 4,
        "without a budget everything equal merges"
    );
    assert_eq!(none_deferred, 0);
    assert!(
        all_vmas >= N / 4,
        "scattered merges cost a mapping each: {all_vmas}"
    );
    assert!(
        vmas <= budget + 8,
        "{vmas} mappings for a budget of {budget}"
    );
    assert!(saved >= N / 2, "the long runs merged whole: {saved}");
    assert!(
        saved < all_saved && deferred > 0,
        "scattered merges stopped at the budget"
    );
}

/// Guests that write all the time (two lockstep sweeps with the same seed,
/// two counter guests) while another thread merges their memory in batches
/// as fast as it can (one batch per 512-frame window, the twin's frames as
/// kept pages, so the batches are runs): no write is lost, and merges and
/// copy-on-write breaks really happen.
#[test]
fn constant_writers_never_lose_a_write_while_batches_merge() {
    if !require_kvm("constant_writers_never_lose_a_write_while_batches_merge") {
        return;
    }
    const FRAMES: u64 = 1024;
    let system = layout::system_frames().end;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 8192)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let workloads = [
        Workload::Sweep {
            seed: 9,
            passes: 100,
        },
        Workload::Sweep {
            seed: 9,
            passes: 100,
        },
        Workload::Counters {
            counters: 4,
            increments: 1_000_000,
        },
        Workload::Counters {
            counters: 4,
            increments: 1_000_000,
        },
    ];
    let mut vms = Vec::new();
    for (i, w) in workloads.into_iter().enumerate() {
        let (id, base) = memory.create_space(&format!("w{i}"), FRAMES, 0).unwrap();
        memory.exclude_from_sharing(id, 0..system).unwrap();
        // Generous limit: a merger that never stops slows these guests a
        // lot (the limit only bounds a hang; a wrong checksum fails below).
        let limit = Duration::from_secs(600);
        let vm = micro_vm_on_space(&kvm, &memory, (id, base), FRAMES, format!("w{i}"), w, limit);
        vms.push((id, vm));
    }
    let ids: Vec<VmId> = vms.iter().map(|v| v.0).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let merged = Arc::new(AtomicU64::new(0));
    let merger = {
        let (memory, stop, merged) = (memory.clone(), stop.clone(), merged.clone());
        std::thread::spawn(move || {
            let mut batches = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (dup, keep) in [(ids[1], ids[0]), (ids[3], ids[2])] {
                    let mut first = system;
                    while first < FRAMES {
                        let len = 512 - first % 512;
                        let pairs = run_pairs(&memory, (dup, first), (keep, first), len, FRAMES);
                        let outcomes = memory.merge_batch(dup, &pairs).unwrap();
                        let n = outcomes
                            .iter()
                            .filter(|&&o| o == MergeOutcome::Merged)
                            .count();
                        merged.fetch_add(n as u64, Ordering::Relaxed);
                        batches += 1;
                        first += len;
                    }
                }
            }
            batches
        })
    };
    for (_, vm) in vms.iter_mut() {
        vm.start().unwrap();
    }
    let mut checks = 0;
    while vms.iter().any(|(_, vm)| !vm.is_finished()) {
        memory
            .verify()
            .expect("invariants while guests write and batches merge");
        checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let batches = merger.join().unwrap();
    for (_, vm) in vms {
        let out = vm.wait();
        for v in &out.vcpus {
            match v {
                disco::vm::VcpuOutcome::Done { result, expected } => {
                    assert_eq!(Some(*result), *expected, "a write was lost: {out:?}")
                }
                other => panic!("{}: the guest did not finish: {other:?}", out.name),
            }
        }
    }
    let stats = memory.sharing_stats();
    let merged = merged.load(Ordering::Relaxed);
    eprintln!("{batches} batches, {merged} frames merged, {checks} checks, {stats:?}");
    assert!(
        merged > 0 && stats.cow_breaks > 0,
        "the race was exercised (merges while the guests ran, and breaks): {stats:?}"
    );
    memory.verify().unwrap();
}

/// A guest that writes into every merged run of its memory while its VM
/// sits at its budget of kernel mappings: the duplicate space's data frames
/// are merged onto a twin's in runs of three with a private frame between
/// (two mappings a run: the budget defers most), a third space takes the
/// pool pages the merges freed (so no copy can go back to its frame's old
/// page), then a 2-vCPU guest fills its memory, breaking every merged run.
/// Its mappings, counted from `/proc/self/maps` while it runs and after,
/// stay within its cap and reserve (copies go next to a neighbour's page,
/// or a unit is unshared), and its checksums are right.
#[test]
fn a_guest_writing_into_every_merged_run_stays_within_its_budget() {
    if !require_kvm("a_guest_writing_into_every_merged_run_stays_within_its_budget") {
        return;
    }
    const FRAMES: u64 = 8192;
    const PER: u64 = 16;
    let system = layout::system_frames().end;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 4 * FRAMES as u32)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    memory.set_frames_per_mapping(PER).unwrap();
    let (keep, _) = memory.create_space("keep", FRAMES, 0).unwrap();
    let (dup, base) = memory.create_space("dup", FRAMES, 0).unwrap();
    memory.exclude_from_sharing(dup, 0..system).unwrap();
    for gfn in system..FRAMES {
        let mut page = vec![3u8; PAGE_SIZE];
        page[..8].copy_from_slice(&gfn.to_le_bytes());
        memory.write_guest_page(keep, gfn, &page).unwrap();
        if gfn % 4 == 3 {
            page[8] = 1; // private to dup
        }
        memory.write_guest_page(dup, gfn, &page).unwrap();
    }
    let mut merged = 0;
    let mut first = system;
    while first < FRAMES {
        let len = 512 - first % 512;
        let pairs = run_pairs(&memory, (dup, first), (keep, first), len, FRAMES);
        let outcomes = memory.merge_batch(dup, &pairs).unwrap();
        merged += outcomes
            .iter()
            .filter(|&&o| o == MergeOutcome::Merged)
            .count() as u64;
        first += len;
    }
    let (at_merge, cap) = memory.space_mappings(dup).unwrap();
    let cap = cap.unwrap();
    let bound = cap + disco::memory::budget::overrun_reserve(FRAMES);
    assert!(
        merged > 0 && at_merge <= cap,
        "{merged} merged, {at_merge} mappings, cap {cap}"
    );
    assert!(
        at_merge + 8 >= cap,
        "the merges spent the budget: {at_merge} of {cap}"
    );
    // The freed pages go to another space: breaks cannot go home.
    let (other, _) = memory.create_space("other", merged, 0).unwrap();
    memory.verify().unwrap();

    let workload = Workload::Fill {
        seed: 11,
        private_seed: 12,
        shared_percent: 100,
        shared_run: 1,
    };
    let limit = Duration::from_secs(300);
    let mut vm = micro_vm_on_space(
        &kvm,
        &memory,
        (dup, base),
        FRAMES,
        "dup".into(),
        workload,
        limit,
    );
    vm.start().unwrap();
    let mut peak = 0;
    while !vm.is_finished() {
        peak = peak.max(vma_count(base, FRAMES) as u64);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = vm.wait();
    for v in &out.vcpus {
        match v {
            disco::vm::VcpuOutcome::Done { result, expected } => {
                assert_eq!(Some(*result), *expected, "a write was lost: {out:?}")
            }
            other => panic!("the guest did not finish: {other:?}"),
        }
    }
    memory.verify().unwrap();
    let end = vma_count(base, FRAMES) as u64;
    let (counted, _) = memory.space_mappings(dup).unwrap();
    let budget = memory.budget_stats();
    let sharing = memory.sharing_stats();
    eprintln!(
        "{merged} frames merged into {at_merge} mappings (cap {cap}, bound {bound}); guest \
         writes: peak {peak}, end {end} mappings; {sharing:?}; {budget:?}"
    );
    assert_eq!(end, counted, "the pmap's count is the kernel's");
    assert!(
        peak.max(end) <= bound,
        "mappings {peak} at peak, {end} at the end, above cap {cap} + reserve"
    );
    assert!(
        sharing.cow_breaks > 0 && budget.breaks_joined > 0,
        "the guest broke merged runs, copies placed next to their neighbours: {budget:?}"
    );
    assert_eq!(
        sharing.shared_machine_pages, 0,
        "every merged run was written"
    );
    for id in [keep, dup, other] {
        memory.destroy_space(id).unwrap();
    }
    assert_eq!(memory.pool_stats()[0].used_pages, 0, "no page leaked");
}
