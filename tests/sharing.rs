//! Copy-on-write page sharing across real KVM guests: real guests write the
//! memory, the scanner merges identical pages (really remapping them), guest
//! writes break the sharing through userfaultfd, and every guest keeps
//! reading exactly what it wrote.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::micro_vm_on_space;
use disco::faults::FaultHandler;
use disco::guest::{layout, Workload};
use disco::kvm_check::require_kvm;
use disco::memory::{Memory, VmId};
use disco::sharing::{ScanState, ScannerConfig};
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement, VmOutcome};
use disco::PAGE_SIZE;

const FRAMES: u64 = 1024; // 4 MiB guests
/// The micro-guest's system area (page tables, parameters, code, stacks) is
/// kept out of sharing, as the monitor does (see ARCHITECTURE.md).
const SYSTEM: u64 = layout::system_frames().end;

fn new_space(memory: &Memory, name: &str, domain: &str) -> (VmId, usize) {
    let (id, base) = memory.create_space_in(name, FRAMES, 0, domain).unwrap();
    memory.exclude_from_sharing(id, 0..SYSTEM).unwrap();
    (id, base)
}

fn run_guest(
    kvm: &kvm_ioctls::Kvm,
    memory: &Memory,
    vm: VmId,
    base: usize,
    workload: Workload,
) -> VmOutcome {
    let spec = MicroVmSpec {
        name: format!("vm{vm}"),
        vcpus: (0..2)
            .map(|_| VcpuPlacement {
                node: 0,
                host_cpus: vec![],
            })
            .collect(),
        workload,
        time_limit: Duration::from_secs(60),
    };
    let ram = GuestRam {
        host_addr: base,
        size: FRAMES as usize * PAGE_SIZE,
    };
    let mut micro = MicroVm::create(kvm, spec, ram).expect("create VM");
    micro.start().expect("start VM");
    let out = micro.wait();
    assert!(out.checksum_ok(), "guest results: {out:?}");
    memory.verify().expect("invariants after a guest run");
    out
}

fn snapshot(memory: &Memory, vm: VmId) -> Vec<Vec<u8>> {
    (0..FRAMES)
        .map(|g| memory.read_guest_page(vm, g).unwrap())
        .collect()
}

/// What the content predicts: machine pages sharing saves (data frames
/// minus distinct non-zero contents minus zero frames) and the zero frames,
/// whose pages are released to the host instead.
fn predicted_saving(contents: &[&Vec<Vec<u8>>]) -> (u64, u64) {
    let mut groups: HashMap<&[u8], u64> = HashMap::new();
    let (mut frames, mut zero) = (0, 0);
    for vm in contents {
        for page in vm.iter().skip(SYSTEM as usize) {
            if page.iter().all(|&b| b == 0) {
                zero += 1;
                continue;
            }
            *groups.entry(page.as_slice()).or_default() += 1;
            frames += 1;
        }
    }
    (frames - groups.len() as u64, zero)
}

fn scan_fully(memory: &Memory, state: &mut ScanState) {
    let before = state.stats.full_scans;
    while state.stats.full_scans < before + 2 {
        state.step(memory, 4096);
    }
}

fn all_domains() -> ScannerConfig {
    ScannerConfig::new(u64::MAX, vec![]).without_time_rules()
}

#[test]
fn identical_guests_share_what_the_content_predicts_and_writes_stay_private() {
    if !require_kvm("identical_guests_share_what_the_content_predicts_and_writes_stay_private") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 8192)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let (a, base_a) = new_space(&memory, "a", "default");
    let (b, base_b) = new_space(&memory, "b", "default");
    // A shared table and untouched (zero) private slices.
    let twin = Workload::TableScan {
        seed: 42,
        table_pages: 128,
        lookups: 100_000,
        write_after: 0,
    };
    run_guest(&kvm, &memory, a, base_a, twin.clone());
    run_guest(&kvm, &memory, b, base_b, twin.clone());

    let (snap_a, snap_b) = (snapshot(&memory, a), snapshot(&memory, b));
    assert_eq!(snap_a, snap_b, "same seed and layout: identical guests");
    let (predicted, zero) = predicted_saving(&[&snap_a, &snap_b]);
    assert!(
        predicted + zero >= FRAMES - SYSTEM,
        "at least every data page of one VM is a duplicate"
    );

    let mut scanner = ScanState::new(all_domains());
    scan_fully(&memory, &mut scanner);
    memory.verify().unwrap();
    let stats = memory.sharing_stats();
    assert_eq!(stats.saved_pages, predicted, "saved pages: {stats:?}");
    assert_eq!(
        memory.pool_stats()[0].used_pages as u64,
        2 * FRAMES - predicted
    );
    assert!(zero > 0, "the private slices are untouched: zero");
    assert_eq!(
        (scanner.stats.zero_releases, stats.released_zero_frames),
        (zero, zero),
        "every zero frame's page is released: {stats:?}"
    );
    assert_eq!(snapshot(&memory, a), snap_a, "merging changed no content");

    // VM a rewrites its memory with another seed, through copy-on-write.
    run_guest(
        &kvm,
        &memory,
        a,
        base_a,
        Workload::Sweep { seed: 7, passes: 2 },
    );
    assert_eq!(snapshot(&memory, b), snap_b, "b never sees a's writes");
    let after = memory.sharing_stats();
    assert!(after.cow_breaks > 0, "a's writes broke sharing: {after:?}");
    assert!(after.cow_break_median_us > 0.0);
    memory.verify().unwrap();

    // b still computes the same results on its (partly shared) memory.
    run_guest(&kvm, &memory, b, base_b, twin);
    memory.destroy_space(a).unwrap();
    memory.destroy_space(b).unwrap();
    memory.verify().unwrap();
    assert_eq!(
        memory.pool_stats()[0].used_pages,
        0,
        "no machine page leaked"
    );
}

#[test]
fn different_sharing_domains_share_nothing() {
    if !require_kvm("different_sharing_domains_share_nothing") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 8192)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let (a, base_a) = new_space(&memory, "a", "tenant-a");
    let (b, base_b) = new_space(&memory, "b", "tenant-b");
    let twin = Workload::Sweep {
        seed: 42,
        passes: 1,
    };
    run_guest(&kvm, &memory, a, base_a, twin.clone());
    run_guest(&kvm, &memory, b, base_b, twin);
    let mut scanner = ScanState::new(all_domains());
    scan_fully(&memory, &mut scanner);
    memory.verify().unwrap();
    // Each domain shares within itself (zero pages, repeated page tables)...
    let within: u64 = [&snapshot(&memory, a)]
        .iter()
        .map(|s| predicted_saving(&[s]).0)
        .sum::<u64>()
        * 2;
    let stats = memory.sharing_stats();
    assert_eq!(
        stats.saved_pages, within,
        "only within-domain sharing: {stats:?}"
    );
    // ...but no machine page is mapped by both.
    let pages_a: Vec<_> = (0..FRAMES)
        .map(|g| memory.lookup(a, g).unwrap().unwrap().page)
        .collect();
    for g in 0..FRAMES {
        let pb = memory.lookup(b, g).unwrap().unwrap().page;
        assert!(!pages_a.contains(&pb), "frame {g} of b maps a page of a");
    }
}

/// Guests that write all the time while the scanner merges as fast as it
/// can: the write-shared counters and lockstep sweeps of identical VMs must
/// still produce exactly the model's results (no write lost), while merges
/// and copy-on-write breaks really happen.
#[test]
fn constant_writers_never_lose_a_write_while_pages_merge() {
    if !require_kvm("constant_writers_never_lose_a_write_while_pages_merge") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 8192)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let workloads = [
        Workload::Counters {
            counters: 4,
            increments: 20_000_000,
        },
        Workload::Counters {
            counters: 4,
            increments: 20_000_000,
        },
        Workload::Sweep {
            seed: 9,
            passes: 2000,
        },
        Workload::Sweep {
            seed: 9,
            passes: 2000,
        },
    ];
    let mut vms = Vec::new();
    for (i, w) in workloads.into_iter().enumerate() {
        let (id, base) = new_space(&memory, &format!("w{i}"), "default");
        let limit = Duration::from_secs(120);
        let vm = micro_vm_on_space(&kvm, &memory, (id, base), FRAMES, format!("w{i}"), w, limit);
        vms.push((id, vm));
    }
    // Release the guests' still-zero data pages before they start, so that
    // their first writes land in punched pages while the scanner keeps
    // merging whatever becomes identical (same-seed sweeps, counters).
    let mut pre = ScanState::new(all_domains());
    scan_fully(&memory, &mut pre);
    assert!(
        pre.stats.zero_releases > 0,
        "zero data pages released before the start"
    );
    // Merging on first sight, so that merges race the writers (the
    // production scanner waits for content to settle, which spares it most
    // of these races but does not make them impossible).
    // And without the CPU share of a busy host (these four guests keep the
    // CPUs busy): the test wants merges while they write.
    let config = disco::sharing::ScannerConfig {
        busy_cpu_share: 1.0,
        ..all_domains().merging_on_first_sight()
    };
    let scanner = disco::sharing::Scanner::start(memory.clone(), config).unwrap();
    for (_, vm) in vms.iter_mut() {
        vm.start().unwrap();
    }
    let mut checks = 0;
    while vms.iter().any(|(_, vm)| !vm.is_finished()) {
        memory
            .verify()
            .expect("invariants while guests write and pages merge");
        checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let scan = scanner.stop();
    for (_, vm) in vms {
        let out = vm.wait();
        assert!(out.checksum_ok(), "a write was lost: {out:?}");
    }
    let stats = memory.sharing_stats();
    eprintln!(
        "merged before start: {}, while running: {scan:?}, {stats:?}",
        pre.stats.merges
    );
    // Writes raced merges: caught before the protection (the compare
    // fails) or after it (a copy-on-write break). Which of the two happens
    // depends on timing; `tests/merge_batch.rs` forces breaks inside runs.
    assert!(
        scan.merges > 0 && scan.compare_failures + stats.cow_breaks > 0,
        "the race was exercised (merges while the guests ran, and writes that raced them): {scan:?} {stats:?}"
    );
    assert!(checks > 0);
    memory.verify().unwrap();
}

/// Random sequences of writes (through the guest mapping and the real
/// fault path), merges and VM rebuilds: every frame always reads what was
/// last written to it, and `verify()` holds after every step.
#[test]
fn random_writes_merges_and_rebuilds_keep_contents() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const VMS: usize = 3;
    const SMALL: u64 = 16;
    #[derive(Clone, Debug)]
    enum Op {
        Write { vm: usize, gfn: u64, value: u8 },
        Scan { pages: u64 },
        Rebuild { vm: usize },
    }
    let op = prop_oneof![
        4 => (0..VMS, 0..SMALL, 0u8..3).prop_map(|(vm, gfn, value)| Op::Write { vm, gfn, value }),
        3 => (1..40u64).prop_map(|pages| Op::Scan { pages }),
        1 => (0..VMS).prop_map(|vm| Op::Rebuild { vm }),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(op, 1..80), |ops| {
            let memory = Arc::new(Memory::new(&[(0, 0, 1024)]).unwrap());
            let handler = FaultHandler::start(memory.clone()).unwrap();
            let mut spaces: Vec<(VmId, usize)> = (0..VMS)
                .map(|v| memory.create_space(&format!("p{v}"), SMALL, 0).unwrap())
                .collect();
            // Model: last value written to each frame (pages are filled with it).
            let mut model: Vec<BTreeMap<u64, u8>> = vec![BTreeMap::new(); VMS];
            let mut scanner = ScanState::new(all_domains());
            for op in ops {
                match op {
                    Op::Write { vm, gfn, value } => {
                        // A plain store through the guest's mapping, like a
                        // guest write: blocks on a shared page until the
                        // handler thread gives this frame a private copy.
                        let addr = spaces[vm].1 + gfn as usize * PAGE_SIZE;
                        // SAFETY: the frame is mapped read-write for the
                        // whole life of the space.
                        unsafe { std::ptr::write_bytes(addr as *mut u8, value, PAGE_SIZE) };
                        model[vm].insert(gfn, value);
                    }
                    Op::Scan { pages } => scanner.step(&memory, pages),
                    Op::Rebuild { vm } => {
                        memory.destroy_space(spaces[vm].0).unwrap();
                        spaces[vm] = memory.create_space("again", SMALL, 0).unwrap();
                        model[vm].clear();
                    }
                }
                memory
                    .verify()
                    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                for (v, (id, _)) in spaces.iter().enumerate() {
                    for gfn in 0..SMALL {
                        let want = model[v].get(&gfn).copied().unwrap_or(0);
                        let page = memory.read_guest_page(*id, gfn).unwrap();
                        prop_assert!(
                            page.iter().all(|&x| x == want),
                            "vm {v} frame {gfn} lost its content"
                        );
                    }
                }
            }
            drop(handler);
            Ok(())
        })
        .unwrap();
}

/// Scans exactly `passes` full passes.
fn scan_passes(memory: &Memory, state: &mut ScanState, passes: u64) {
    let target = state.stats.full_scans + passes;
    while state.stats.full_scans < target {
        state.step(memory, 1);
    }
}

/// A page that a write broke after a merge is merged again only once its
/// content has held still for 1 pass, then 2 after the second break, ...:
/// volatile pages stop costing a merge and a copy-on-write break per pass.
/// The writes go through the real guest mapping and the real fault handler.
#[test]
fn a_page_broken_after_a_merge_must_hold_still_before_it_is_merged_again() {
    let memory = Arc::new(Memory::new(&[(0, 0, 4096)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let (a, base_a) = new_space(&memory, "a", "default");
    let (b, _) = new_space(&memory, "b", "default");
    const X: u64 = SYSTEM + 5;
    let content: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8 + 1).collect();
    memory.write_guest_page(a, X, &content).unwrap();
    memory.write_guest_page(b, X, &content).unwrap();
    let shared = |vm| memory.lookup(vm, X).unwrap().unwrap().flags.shared;
    let word = (base_a + X as usize * PAGE_SIZE) as *mut u64;

    let mut scanner = ScanState::new(all_domains());
    scan_passes(&memory, &mut scanner, 1);
    assert!(!shared(a), "first sight: not settled yet");
    scan_passes(&memory, &mut scanner, 1);
    assert!(
        shared(a) && shared(b),
        "identical pages merge once seen unchanged on two passes"
    );

    for (round, needed) in [1u64, 2, 4].into_iter().enumerate() {
        // A write through a's mapping breaks the sharing (the fault handler
        // copies the page); putting the old word back makes the content
        // identical to b's again.
        // SAFETY: an aligned word of a's guest RAM, mapped by the memory.
        unsafe {
            let old = std::ptr::read_volatile(word);
            std::ptr::write_volatile(word, old ^ 0xff);
            std::ptr::write_volatile(word, old);
        }
        assert!(
            !shared(a) && !shared(b),
            "round {round}: the write broke it"
        );
        memory.verify().unwrap();
        // The pass that finds the break, then `needed - 1` stable passes:
        // still apart.
        let skips = scanner.stats.unstable_skips;
        scan_passes(&memory, &mut scanner, needed);
        assert!(
            !shared(a),
            "round {round}: merged after {needed} passes, needs {needed} stable ones"
        );
        assert!(scanner.stats.unstable_skips > skips);
        // One more stable pass: merged again.
        scan_passes(&memory, &mut scanner, 1);
        assert!(
            shared(a) && shared(b),
            "round {round}: merged again after {needed} stable passes: {:?}",
            scanner.stats
        );
        assert_eq!(memory.read_guest_page(a, X).unwrap(), content);
        assert_eq!(memory.read_guest_page(b, X).unwrap(), content);
    }
    // Once no guest writes any more (the monitor's final passes), a broken
    // page is merged on sight again, whatever its history.
    // SAFETY: as above.
    unsafe {
        let old = std::ptr::read_volatile(word);
        std::ptr::write_volatile(word, old ^ 0xff);
        std::ptr::write_volatile(word, old);
    }
    assert!(!shared(a));
    scanner.quiescent = true;
    scan_passes(&memory, &mut scanner, 1);
    assert!(shared(a) && shared(b), "quiescent: merged in one pass");
    memory.verify().unwrap();
    memory.destroy_space(a).unwrap();
    memory.destroy_space(b).unwrap();
    memory.verify().unwrap();
    assert_eq!(memory.pool_stats()[0].used_pages, 0, "no page leaked");
}

/// Fills two spaces with the same `TableScan` guest and scans them once
/// with the time rules in force (content must hold still 200 ms before it
/// merges); with `pausers`, the memory layer knows the guests' vCPUs (which
/// have exited by then). Returns the scanner's merges, what the content
/// predicts, and the memory's saved pages.
fn one_pass_after_guests(kvm: &kvm_ioctls::Kvm, pausers: bool) -> (u64, u64, u64) {
    let memory = Arc::new(Memory::new(&[(0, 0, 4096)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let twin = Workload::TableScan {
        seed: 42,
        table_pages: 128,
        lookups: 10_000,
        write_after: 0,
    };
    let mut spaces = Vec::new();
    for name in ["a", "b"] {
        let (vm, base) = new_space(&memory, name, "default");
        let spec = MicroVmSpec {
            name: name.into(),
            vcpus: vec![VcpuPlacement {
                node: 0,
                host_cpus: vec![],
            }],
            workload: twin.clone(),
            time_limit: Duration::from_secs(60),
        };
        let ram = GuestRam {
            host_addr: base,
            size: FRAMES as usize * PAGE_SIZE,
        };
        let mut micro = MicroVm::create(kvm, spec, ram).expect("create VM");
        if pausers {
            memory.set_pauser(vm, micro.pauser()).unwrap();
        }
        micro.start().expect("start VM");
        assert!(micro.wait().checksum_ok());
        spaces.push(vm);
    }
    let snaps: Vec<_> = spaces.iter().map(|&vm| snapshot(&memory, vm)).collect();
    let (predicted, _zero) = predicted_saving(&[&snaps[0], &snaps[1]]);
    let mut scanner = ScanState::new(ScannerConfig::new(u64::MAX, vec![]));
    // One pass over both spaces (in the scanner's windows, as its thread
    // steps).
    scanner.step(&memory, 2 * FRAMES);
    memory.verify().unwrap();
    for (vm, snap) in spaces.iter().zip(&snaps) {
        assert_eq!(&snapshot(&memory, *vm), snap, "merging changed no content");
    }
    let saved = memory.sharing_stats().saved_pages;
    (scanner.stats.merges, predicted, saved)
}

/// A VM whose vCPUs have all exited (or that the monitor paused) cannot
/// change its memory, so its content merges on the scanner's first sight;
/// where the memory layer cannot tell (no pauser), content must first hold
/// still for `settle_age` across two passes. One pass instead of two or
/// three took the sharing bench's time to its savings from 640 to 180 ms.
#[test]
fn a_stopped_vms_content_merges_on_first_sight() {
    if !require_kvm("a_stopped_vms_content_merges_on_first_sight") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (merges, predicted, saved) = one_pass_after_guests(&kvm, true);
    assert!(predicted >= 128, "the table is shared: {predicted}");
    assert_eq!(
        (merges, saved),
        (predicted, predicted),
        "stopped guests: every duplicate merged in one pass"
    );
    let (merges, _, saved) = one_pass_after_guests(&kvm, false);
    assert_eq!(
        (merges, saved),
        (0, 0),
        "guests the scanner cannot see stopped: content waits to settle"
    );
}
