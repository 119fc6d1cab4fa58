//! Page sharing's hot paths, one at a time:
//!
//! * `page_hash`: xxh3 of a 4 KiB page (`disco::memory::cow::page_hash`);
//! * `page_compare`: comparing two identical 4 KiB pages (what a merge does
//!   under write protection);
//! * `merge`: `Memory::merge` of two frames with identical content
//!   (protect both, compare, remap the duplicate, free its page); the
//!   frames are split again between iterations, untimed, by a write;
//! * `cow_break`: a host thread's store into a shared page through the real
//!   fault path (userfaultfd write-protect fault, the `FaultHandler` thread
//!   copies and remaps, wake, the store retries): the whole round trip as the
//!   writer sees it; re-merged between iterations, untimed;
//! * `scan_page`: `Memory::scan_page` (lock, pmap lookup, hash, zero check);
//! * `merge_run_512/batch` and `merge_run_512/single`: merging 512
//!   consecutive frames of one space onto the same frames of a twin space
//!   (consecutive kept pages), with one `Memory::merge_batch` or with 512
//!   `Memory::merge` calls; throughput per merged page. The duplicate space
//!   is made afresh, untimed, for each iteration. `batch_with_8_kvm_vms`
//!   and `batch_with_64_kvm_vms`: the batch with that many KVM VMs open in
//!   the process (each registers an MMU notifier that every page-table
//!   change of the process calls);
//! * `zero_release_512/release`: `Memory::release_zero_frames` of 512
//!   resident zero frames (protect, check, punch, unprotect), per page;
//! * `zero_release_512/first_read_released` and `.../read_resident`: one
//!   byte read through the guest mapping from each of 512 frames whose
//!   pages were released (the kernel allocates a zero page in place), and
//!   from 512 resident frames: what a later read of a released frame costs
//!   (a guest's read adds the same KVM fault any remap costs it).
//!
//! `disco bench sharing` measures the whole scanner against KSM. Needs root
//! (userfaultfd) for `merge` and `cow_break`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use disco::faults::FaultHandler;
use disco::guest::model::page_content;
use disco::memory::cow::page_hash;
use disco::memory::{Memory, MergeOutcome, MergePair, VmId};
use disco::PAGE_SIZE;

fn page_bytes(seed: u64) -> Vec<u8> {
    page_content(seed, 1)
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn hash_and_compare(c: &mut Criterion) {
    let mut group = c.benchmark_group("sharing");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let page = page_bytes(7);
    group.bench_function("page_hash", |b| b.iter(|| page_hash(black_box(&page))));
    let twin = page.clone();
    group.bench_function("page_compare", |b| {
        b.iter(|| black_box(&page[..]) == black_box(&twin[..]))
    });
    group.finish();
}

/// Two one-frame guest spaces holding the same content, and a fault handler.
struct Pair {
    memory: Arc<Memory>,
    _handler: FaultHandler,
    a: (VmId, usize),
    b: (VmId, usize),
}

impl Pair {
    fn new() -> Option<Pair> {
        let memory = Arc::new(Memory::new(&[(0, 0, 256)]).expect("monitor memory"));
        if memory.userfault().is_none() {
            eprintln!("benches/sharing: merge and cow_break need userfaultfd (root); skipped");
            return None;
        }
        let handler = FaultHandler::start(memory.clone()).expect("fault handler");
        let a = memory.create_space("a", 1, 0).unwrap();
        let b = memory.create_space("b", 1, 0).unwrap();
        let page = page_bytes(9);
        memory.write_guest_page(a.0, 0, &page).unwrap();
        memory.write_guest_page(b.0, 0, &page).unwrap();
        Some(Pair {
            memory,
            _handler: handler,
            a,
            b,
        })
    }

    fn page(&self, vm: VmId) -> disco::memory::MachinePage {
        self.memory.lookup(vm, 0).unwrap().unwrap().page
    }

    fn shared(&self) -> bool {
        self.page(self.a.0) == self.page(self.b.0)
    }

    fn merge(&self) -> MergeOutcome {
        let (a, b) = (self.a.0, self.b.0);
        self.memory
            .merge((b, 0, self.page(b)), (a, 0, self.page(a)))
            .unwrap()
    }

    /// A store of the byte already there into b's frame, through its guest
    /// mapping: on a shared page it blocks until the fault handler has given
    /// b a private copy; the content stays the same.
    fn store_b(&self) {
        let addr = self.b.1 as *mut u8;
        // SAFETY: frame 0 of b is mapped read-write for the space's life.
        unsafe { std::ptr::write_volatile(addr, std::ptr::read_volatile(addr)) };
    }
}

fn merge_and_break(c: &mut Criterion) {
    let Some(pair) = Pair::new() else {
        return;
    };
    let mut group = c.benchmark_group("sharing");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("merge", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if pair.shared() {
                    pair.store_b();
                }
                let t = Instant::now();
                let outcome = pair.merge();
                total += t.elapsed();
                assert_eq!(outcome, MergeOutcome::Merged);
            }
            total
        })
    });
    group.bench_function("cow_break", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if !pair.shared() {
                    assert_eq!(pair.merge(), MergeOutcome::Merged);
                }
                let t = Instant::now();
                pair.store_b();
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function("scan_page", |bench| {
        bench.iter(|| pair.memory.scan_page(black_box(pair.a.0), 0).unwrap())
    });
    group.finish();
    let stats = pair.memory.sharing_stats();
    eprintln!(
        "benches/sharing: {} merges, {} copy-on-write breaks, handler time median {:.1} µs, p99 {:.1} µs",
        stats.merges, stats.cow_breaks, stats.cow_break_median_us, stats.cow_break_p99_us
    );
    pair.memory
        .verify()
        .expect("memory invariants after the benches");
}

/// 512 frames merged onto a twin's, in one batch or one merge at a time.
fn merge_runs(c: &mut Criterion) {
    const N: u64 = 512;
    let memory = Memory::new(&[(0, 0, 8 * N as u32)]).expect("monitor memory");
    if memory.userfault().is_none() {
        eprintln!("benches/sharing: merge_run_512 needs userfaultfd (root); skipped");
        return;
    }
    let content: Vec<Vec<u8>> = (0..N).map(|g| page_bytes(100 + g)).collect();
    let (keep, _) = memory.create_space("keep", N, 0).unwrap();
    for (g, page) in content.iter().enumerate() {
        memory.write_guest_page(keep, g as u64, page).unwrap();
    }
    let keep_pages: Vec<_> = (0..N)
        .map(|g| memory.lookup(keep, g).unwrap().unwrap().page)
        .collect();
    // A fresh duplicate of `keep` and the pairs that merge it.
    let twin = || {
        let (dup, _) = memory.create_space("dup", N, 0).unwrap();
        for (g, page) in content.iter().enumerate() {
            memory.write_guest_page(dup, g as u64, page).unwrap();
        }
        let pairs: Vec<MergePair> = (0..N)
            .map(|g| MergePair {
                dup_gfn: g,
                dup_page: memory.lookup(dup, g).unwrap().unwrap().page,
                keep: (keep, g, keep_pages[g as usize]),
            })
            .collect();
        (dup, pairs)
    };
    let mut group = c.benchmark_group("sharing/merge_run_512");
    group.throughput(Throughput::Elements(N));
    group.sample_size(20);
    // One batch of the 512 frames per iteration, timed; a fresh duplicate
    // made and removed around it, untimed.
    let time_batches = |iters: u64| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let (dup, pairs) = twin();
            let t = Instant::now();
            let outcomes = memory.merge_batch(dup, &pairs).unwrap();
            total += t.elapsed();
            assert!(outcomes.iter().all(|&o| o == MergeOutcome::Merged));
            memory.destroy_space(dup).unwrap();
        }
        total
    };
    group.bench_function("batch", |bench| bench.iter_custom(time_batches));
    for extra in [8usize, 64] {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vms: Vec<_> = (0..extra)
            .map(|_| kvm.create_vm().expect("a KVM VM"))
            .collect();
        group.bench_function(format!("batch_with_{extra}_kvm_vms"), |bench| {
            bench.iter_custom(time_batches)
        });
        drop(vms);
    }
    group.bench_function("single", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (dup, pairs) = twin();
                let t = Instant::now();
                for p in &pairs {
                    let outcome = memory.merge((dup, p.dup_gfn, p.dup_page), p.keep).unwrap();
                    assert_eq!(outcome, MergeOutcome::Merged);
                }
                total += t.elapsed();
                memory.destroy_space(dup).unwrap();
            }
            total
        })
    });
    group.finish();
    memory
        .verify()
        .expect("memory invariants after the batched merges");
}

/// Releasing 512 zero frames, and what reading them again costs.
fn zero_release(c: &mut Criterion) {
    const N: u64 = 512;
    let memory = Arc::new(Memory::new(&[(0, 0, 4 * N as u32)]).expect("monitor memory"));
    if memory.userfault().is_none() {
        eprintln!("benches/sharing: zero_release_512 needs userfaultfd (root); skipped");
        return;
    }
    let _handler = FaultHandler::start(memory.clone()).expect("fault handler");
    let zero = vec![0u8; PAGE_SIZE];
    // A space of N resident zero frames, and the frames to release.
    let zeroed = || {
        let (vm, base) = memory.create_space("zero", N, 0).unwrap();
        for g in 0..N {
            memory.write_guest_page(vm, g, &zero).unwrap();
        }
        let frames: Vec<_> = (0..N)
            .map(|g| (g, memory.lookup(vm, g).unwrap().unwrap().page))
            .collect();
        (vm, base, frames)
    };
    let read_all = |base: usize| {
        for g in 0..N as usize {
            // SAFETY: frame g of a live space, mapped readable.
            black_box(unsafe { std::ptr::read_volatile((base + g * PAGE_SIZE) as *const u8) });
        }
    };
    let mut group = c.benchmark_group("sharing/zero_release_512");
    group.throughput(Throughput::Elements(N));
    group.sample_size(20);
    group.bench_function("release", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (vm, _, frames) = zeroed();
                let t = Instant::now();
                let done = memory.release_zero_frames(vm, &frames).unwrap();
                total += t.elapsed();
                assert!(done.iter().all(|&d| d));
                memory.destroy_space(vm).unwrap();
            }
            total
        })
    });
    for (name, release) in [("first_read_released", true), ("read_resident", false)] {
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (vm, base, frames) = zeroed();
                    if release {
                        memory.release_zero_frames(vm, &frames).unwrap();
                    }
                    let t = Instant::now();
                    read_all(base);
                    total += t.elapsed();
                    memory.destroy_space(vm).unwrap();
                }
                total
            })
        });
    }
    group.finish();
    memory
        .verify()
        .expect("memory invariants after the releases");
}

criterion_group!(
    benches,
    hash_and_compare,
    merge_and_break,
    merge_runs,
    zero_release
);
criterion_main!(benches);
