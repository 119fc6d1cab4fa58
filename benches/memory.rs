//! The memory side's hot paths, one at a time:
//!
//! * `move_page`: `Memory::move_page` of one 4 KiB private frame between the
//!   pools of two nodes (write-protect when userfaultfd is there, copy into
//!   a fresh page, `mmap(MAP_FIXED)` remap, free the old page): what one
//!   page migration costs the monitor, alternating node 0 -> 1 -> 0;
//! * `move_pages_512`: `Memory::move_pages` of 512 consecutive private
//!   frames (2 MiB) in one call, alternating node 0 -> 1 -> 0: one
//!   write-protect, one pool run, one copy, one remap and one hole punch
//!   for the run (throughput per page, to compare with `move_page`);
//! * `lookup`: `Memory::lookup` (memory lock + pmap entry), what the scanner
//!   and the policy engine pay per frame;
//! * `pmap_get`: `Pmap::get` alone (the array behind it), random frames of a
//!   64 MiB guest;
//! * `memmap_get`: `Memmap::get` of a machine page among 16 384 in use
//!   (Disco's backmap: refcount and owners), random pages.
//!
//! * `first_touch/{anonymous,shmem,disco_space}`: the host's first write
//!   to each page of 2 MiB of fresh memory (one byte per page, 512 page
//!   faults): private anonymous memory (what a plain KVM user has), a
//!   memfd mapped shared (disco's memory type, `bench::bare::BareMemory`),
//!   and a guest space of the monitor (pool run, `mbind`, userfaultfd
//!   write-protect registration). A guest's first touch of a page costs the
//!   same fault plus KVM's, so the gap between these is the part of the
//!   overhead bench's disco/bare ratio that is the memory type's.
//!
//! Page hash, compare, merge and copy-on-write break are in
//! `benches/sharing.rs`. Migration under running guests is measured by the
//! migration scenario of `disco bench`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use disco::bench::bare::{BareMemory, BareRam};
use disco::memory::memmap::Memmap;
use disco::memory::pmap::{PageFlags, Pmap, PmapEntry};
use disco::memory::{MachinePage, Memory};
use disco::PAGE_SIZE;

/// A small deterministic sequence of indexes (xorshift), so lookups are not
/// sequential.
fn indexes(n: u64, count: usize) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        })
        .collect()
}

/// Writes one byte to each page of `len` bytes at `addr`: one first-touch
/// page fault per page.
fn touch_pages(addr: usize, len: usize) {
    for offset in (0..len).step_by(PAGE_SIZE) {
        // SAFETY: `addr..addr + len` is a writable mapping the caller owns.
        unsafe { std::ptr::write_volatile((addr + offset) as *mut u8, 1) };
    }
}

fn first_touch(c: &mut Criterion) {
    const PAGES: usize = 512;
    const LEN: usize = PAGES * PAGE_SIZE;
    let mut group = c.benchmark_group("memory/first_touch");
    group.throughput(Throughput::Elements(PAGES as u64));
    for (name, kind) in [
        ("anonymous", BareMemory::Anonymous),
        ("shmem", BareMemory::Shmem),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || BareRam::of(LEN, kind).expect("fresh memory"),
                |ram| {
                    touch_pages(ram.guest().host_addr, LEN);
                    ram
                },
                BatchSize::PerIteration,
            )
        });
    }
    /// A guest space, destroyed (outside the timing) when dropped.
    struct Space<'a>(&'a Memory, u32);
    impl Drop for Space<'_> {
        fn drop(&mut self) {
            self.0.destroy_space(self.1).expect("destroying the space");
        }
    }
    let memory = Memory::new(&[(0, 0, 4 * PAGES as u32)]).expect("monitor memory, one pool");
    group.bench_function("disco_space", |b| {
        b.iter_batched(
            || {
                let (vm, addr) = memory
                    .create_space("t", PAGES as u64, 0)
                    .expect("a guest space");
                (Space(&memory, vm), addr)
            },
            |(space, addr)| {
                touch_pages(addr, LEN);
                space
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn move_page(c: &mut Criterion) {
    let memory = Memory::new(&[(0, 0, 1024), (1, 0, 1024)]).expect("monitor memory, two pools");
    let (vm, _) = memory.create_space("m", 16, 0).expect("a guest space");
    memory
        .write_guest_page(vm, 3, &vec![0xA5; PAGE_SIZE])
        .expect("a page to move");
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let mut node = 0;
    group.bench_function("move_page", |b| {
        b.iter(|| {
            node = 1 - node;
            memory.move_page(vm, 3, node).expect("move_page")
        })
    });
    group.finish();
    assert_eq!(
        memory.read_guest_page(vm, 3).unwrap(),
        vec![0xA5; PAGE_SIZE]
    );
}

fn move_pages(c: &mut Criterion) {
    const RUN: u64 = 512;
    let memory = Memory::new(&[(0, 0, 2048), (1, 0, 2048)]).expect("monitor memory, two pools");
    let (vm, _) = memory.create_space("m", RUN, 0).expect("a guest space");
    for gfn in 0..RUN {
        memory
            .write_guest_page(vm, gfn, &vec![gfn as u8; PAGE_SIZE])
            .expect("pages to move");
    }
    let gfns: Vec<u64> = (0..RUN).collect();
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(RUN));
    let mut node = 0;
    group.bench_function("move_pages_512", |b| {
        b.iter(|| {
            node = 1 - node;
            let report = memory.move_pages(vm, &gfns, node).expect("move_pages");
            assert!(report.failed.is_empty());
            report
        })
    });
    group.finish();
    memory.verify().expect("invariants after the batched moves");
    assert_eq!(
        memory.read_guest_page(vm, 77).unwrap(),
        vec![77u8; PAGE_SIZE]
    );
    memory.verify().expect("memory invariants after the moves");
}

fn lookups(c: &mut Criterion) {
    let frames = 16_384u64; // 64 MiB
    let memory = Memory::new(&[(0, 0, frames as u32 + 64)]).expect("monitor memory");
    let (vm, _) = memory.create_space("l", frames, 0).expect("a guest space");
    let idx = indexes(frames, 4096);
    let mut group = c.benchmark_group("memory");
    let mut i = 0;
    group.bench_function("lookup", |b| {
        b.iter(|| {
            i = (i + 1) % idx.len();
            memory.lookup(vm, black_box(idx[i])).unwrap()
        })
    });

    let mut pmap = Pmap::new(frames);
    let mut memmap = Memmap::default();
    for g in 0..frames {
        let page = MachinePage {
            node: (g % 4) as u16,
            index: (g / 4) as u32,
        };
        pmap.set(
            g,
            Some(PmapEntry {
                page,
                flags: PageFlags::default(),
            }),
        );
        memmap.add_owner(page, 1, g);
    }
    group.bench_function("pmap_get", |b| {
        b.iter(|| {
            i = (i + 1) % idx.len();
            pmap.get(black_box(idx[i]))
        })
    });
    let pages: Vec<MachinePage> = idx.iter().map(|&g| pmap.get(g).unwrap().page).collect();
    group.bench_function("memmap_get", |b| {
        b.iter(|| {
            i = (i + 1) % pages.len();
            memmap.get(black_box(pages[i])).map(|p| p.refcount)
        })
    });
    group.finish();
}

criterion_group!(benches, first_touch, move_page, move_pages, lookups);
criterion_main!(benches);
