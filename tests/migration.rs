//! The migration mechanism under running guests: frames move between
//! node pools while real vCPUs read and write them; no write is lost (the
//! guests' checksums match the host model) and `verify()` holds throughout.

use std::sync::Arc;
use std::time::Duration;

use disco::faults::FaultHandler;
use disco::guest::{layout, Workload};
use disco::kvm_check::require_kvm;
use disco::memory::Memory;
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement};
use disco::PAGE_SIZE;

/// Guest frames of the sweep guests below (8 MiB).
const FRAMES: u64 = 2048;

/// A memory with two node pools and a running fault handler (and page
/// sampling, with `sampling`), and a started 2-vCPU sweep guest (`seed`,
/// 400 passes) in an 8 MiB space on node 0.
fn start_sweeper(
    kvm: &kvm_ioctls::Kvm,
    name: &str,
    seed: u64,
    sampling: bool,
) -> (Arc<Memory>, FaultHandler, disco::memory::VmId, MicroVm) {
    let memory = Arc::new(Memory::new(&[(0, 0, 8192), (1, 0, 8192)]).unwrap());
    if sampling {
        memory.enable_sampling().unwrap();
    }
    let handler = FaultHandler::start(memory.clone()).unwrap();
    let (vm, base) = memory.create_space(name, FRAMES, 0).unwrap();
    let spec = MicroVmSpec {
        name: name.into(),
        vcpus: (0..2)
            .map(|_| VcpuPlacement {
                node: 1,
                host_cpus: vec![],
            })
            .collect(),
        workload: Workload::Sweep { seed, passes: 400 },
        time_limit: Duration::from_secs(300),
    };
    let ram = GuestRam {
        host_addr: base,
        size: FRAMES as usize * PAGE_SIZE,
    };
    let mut guest = MicroVm::create(kvm, spec, ram).unwrap();
    guest.start().unwrap();
    (memory, handler, vm, guest)
}

#[test]
fn pages_migrate_under_running_writers_without_losing_a_write() {
    if !require_kvm("pages_migrate_under_running_writers_without_losing_a_write") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (memory, _handler, vm, guest) = start_sweeper(&kvm, "mover", 5, false);
    let first_data = layout::DATA_ADDR / layout::PAGE;
    let mut moved = 0u64;
    let mut gfn = first_data;
    while !guest.is_finished() {
        // Walk the data area, moving each frame to the other node.
        let node = memory.lookup(vm, gfn).unwrap().unwrap().page.node();
        memory.move_page(vm, gfn, 1 - node).unwrap();
        moved += 1;
        if moved.is_multiple_of(256) {
            memory.verify().expect("invariants while pages migrate");
        }
        gfn = if gfn + 1 >= FRAMES {
            first_data
        } else {
            gfn + 1
        };
    }
    let out = guest.wait();
    assert!(
        out.checksum_ok(),
        "a write was lost during migration: {out:?}"
    );
    assert!(
        moved > 1000,
        "enough migrations happened under the guest: {moved}"
    );
    memory.verify().unwrap();
    let stats = memory.space_stats(vm).unwrap();
    assert_eq!(stats.pages_per_node.iter().sum::<u64>(), FRAMES);
    memory.destroy_space(vm).unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.used_pages == 0));
}

/// A page of `tag`: every byte depends on the tag and its offset.
fn page_of(tag: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (tag as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(11) ^ (tag >> 8) as u8)
        .collect()
}

fn node_of(memory: &Memory, vm: u32, gfn: u64) -> usize {
    memory.lookup(vm, gfn).unwrap().unwrap().page.node()
}

#[test]
fn a_batched_move_keeps_contents_in_one_remap_per_run() {
    const FRAMES: u64 = 96;
    let memory = Memory::new(&[(0, 0, 256), (1, 0, 256)]).unwrap();
    let (vm, base) = memory.create_space("batch", FRAMES, 0).unwrap();
    for gfn in 0..FRAMES {
        memory.write_guest_page(vm, gfn, &page_of(gfn)).unwrap();
    }
    let all: Vec<u64> = (0..FRAMES).rev().collect(); // any order
    let report = memory.move_pages(vm, &all, 1).unwrap();
    assert_eq!(report.moved.len(), FRAMES as usize, "{report:?}");
    assert!(report.failed.is_empty() && report.unchanged.is_empty());
    assert_eq!(
        report.runs, 1,
        "one contiguous run of the target pool: {report:?}"
    );
    memory.verify().unwrap();
    for gfn in 0..FRAMES {
        assert_eq!(node_of(&memory, vm, gfn), 1);
        assert_eq!(memory.read_guest_page(vm, gfn).unwrap(), page_of(gfn));
        // And through the guest's own mapping, which is what a vCPU sees.
        // SAFETY: a mapped frame of the space, no guest running.
        let seen = unsafe {
            std::slice::from_raw_parts((base + gfn as usize * PAGE_SIZE) as *const u8, PAGE_SIZE)
        };
        assert_eq!(
            seen,
            page_of(gfn).as_slice(),
            "frame {gfn} via the guest mapping"
        );
    }
    let pools = memory.pool_stats();
    assert_eq!(
        (pools[0].used_pages, pools[1].used_pages),
        (0, FRAMES as u32)
    );
    // The old pages were not punched: they stay warm (resident, free) as
    // copy targets, and only they are resident in pool 0.
    assert_eq!(pools[0].warm_pages, FRAMES as u32, "{pools:?}");
    assert_eq!(
        pools[0].resident_bytes,
        FRAMES * PAGE_SIZE as u64,
        "pool 0 holds exactly its warm pages"
    );

    // Back again in pieces with gaps and duplicates: only the named frames move.
    let some: Vec<u64> = (0..FRAMES)
        .filter(|g| g % 7 != 3)
        .chain([5, 5, 40])
        .collect();
    let report = memory.move_pages(vm, &some, 0).unwrap();
    let named: std::collections::BTreeSet<u64> = some.iter().copied().collect();
    assert_eq!(
        report.moved.len(),
        named.len(),
        "each frame once: {report:?}"
    );
    assert!(
        report.runs > 1 && report.runs < named.len() as u64,
        "{report:?}"
    );
    memory.verify().unwrap();
    let pools = memory.pool_stats();
    assert_eq!(
        pools[0].warm_reused_pages,
        named.len() as u64,
        "every copy target of the way back was a warm page: {pools:?}"
    );
    for gfn in 0..FRAMES {
        let want = if named.contains(&gfn) { 0 } else { 1 };
        assert_eq!(node_of(&memory, vm, gfn), want, "frame {gfn}");
        assert_eq!(memory.read_guest_page(vm, gfn).unwrap(), page_of(gfn));
    }
    // Written after the move: the frames are private and writable again.
    for gfn in [0, 3, 50] {
        memory
            .write_guest_page(vm, gfn, &page_of(gfn + 1000))
            .unwrap();
        assert_eq!(
            memory.read_guest_page(vm, gfn).unwrap(),
            page_of(gfn + 1000)
        );
    }
    memory.verify().unwrap();
    memory.destroy_space(vm).unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.used_pages == 0));
}

#[test]
fn a_mixed_batch_moves_private_runs_and_shared_pages_and_refuses_the_rest() {
    const FRAMES: u64 = 32;
    let memory = Memory::new(&[(0, 0, 256), (1, 0, 256), (2, 0, 256)]).unwrap();
    let (a, _) = memory.create_space("a", FRAMES, 0).unwrap();
    let (b, _) = memory.create_space("b", FRAMES, 0).unwrap();
    for gfn in 0..FRAMES {
        memory.write_guest_page(a, gfn, &page_of(gfn)).unwrap();
        memory
            .write_guest_page(b, gfn, &page_of(100 + gfn))
            .unwrap();
    }
    // a:4 is shared with b:20, a:5 with a:6 (one VM, two frames), a:10 is
    // a hole, a:12 is replicated (shared with b:12, b runs on node 1).
    memory.share_page(a, 4, b, 20).unwrap();
    memory.share_page(a, 5, a, 6).unwrap();
    memory.unmap_page(a, 10).unwrap();
    memory.set_cpu_node(b, 1).unwrap();
    memory.share_page(a, 12, b, 12).unwrap();
    assert_eq!(memory.replicate_page(a, 12, &[1]).unwrap(), 1);
    // a:14 already lives on node 2.
    memory.unmap_page(a, 14).unwrap();
    memory.map_page(a, 14, 2).unwrap();
    memory.verify().unwrap();

    let gfns: Vec<u64> = (0..16).chain([FRAMES, FRAMES + 5]).collect();
    let report = memory.move_pages(a, &gfns, 2).unwrap();
    memory.verify().unwrap();
    let failed: Vec<u64> = report.failed.iter().map(|(g, _)| *g).collect();
    assert_eq!(failed, vec![10, 12, FRAMES, FRAMES + 5], "{report:?}");
    assert!(report.failed[0].1.contains("not mapped"), "{report:?}");
    assert!(report.failed[1].1.contains("replica"), "{report:?}");
    assert!(report.failed[2].1.contains("outside"), "{report:?}");
    // a:6 moved with a:5 (same machine page), so it was already there.
    let mut unchanged = report.unchanged.clone();
    unchanged.sort_unstable();
    assert_eq!(unchanged, vec![6, 14], "{report:?}");
    assert_eq!(report.shared_moves, 2, "a:4 and a:5 took the shared path");
    assert_eq!(report.moved.len(), 16 - 4, "{report:?}");
    // Private runs: 0-3, 7-9, 11, 13, 15 (a shared frame, a hole, a replica
    // and a frame already there cut the range).
    assert_eq!(report.runs, 5, "{report:?}");
    for gfn in (0..16).filter(|g| ![10, 12].contains(g)) {
        assert_eq!(node_of(&memory, a, gfn), 2, "a:{gfn}");
    }
    assert_eq!(
        node_of(&memory, b, 20),
        2,
        "a shared page moves for every owner"
    );
    assert_eq!(
        memory.lookup(a, 5).unwrap().unwrap().page,
        memory.lookup(a, 6).unwrap().unwrap().page
    );
    assert!(memory.lookup(a, 4).unwrap().unwrap().flags.write_protected);
    assert_eq!(node_of(&memory, a, 12), 0, "a replica is not migrated");
    assert_eq!(node_of(&memory, b, 12), 1);
    for gfn in (0..16).filter(|&g| g != 10 && g != 14) {
        let want = match gfn {
            6 => page_of(5),
            _ => page_of(gfn),
        };
        assert_eq!(memory.read_guest_page(a, gfn).unwrap(), want, "a:{gfn}");
    }
    assert_eq!(memory.read_guest_page(b, 20).unwrap(), page_of(4));
    assert!(
        memory.lookup(a, 10).unwrap().is_none(),
        "a hole stays a hole"
    );
    memory.destroy_space(a).unwrap();
    memory.destroy_space(b).unwrap();
    memory.verify().unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.used_pages == 0));
}

#[test]
fn a_batch_into_a_fragmented_or_full_pool_splits_and_fails_cleanly() {
    let memory = Memory::new(&[(0, 0, 256), (1, 0, 40)]).unwrap();
    // Fill the node 1 pool, then free every other page: 20 free pages, no
    // two of them consecutive.
    let (filler, _) = memory.create_space("filler", 40, 1).unwrap();
    for gfn in (0..40).step_by(2) {
        memory.unmap_page(filler, gfn).unwrap();
    }
    let (vm, _) = memory.create_space("mover", 32, 0).unwrap();
    for gfn in 0..32 {
        memory.write_guest_page(vm, gfn, &page_of(gfn)).unwrap();
    }
    let report = memory
        .move_pages(vm, &(0..16).collect::<Vec<_>>(), 1)
        .unwrap();
    assert_eq!(report.moved.len(), 16, "{report:?}");
    assert_eq!(report.runs, 16, "one piece per free page: {report:?}");
    memory.verify().unwrap();

    // 4 free pages left on node 1: 4 frames move, 12 stay, unprotected.
    let report = memory
        .move_pages(vm, &(16..32).collect::<Vec<_>>(), 1)
        .unwrap();
    assert_eq!(report.moved, vec![16, 17, 18, 19], "{report:?}");
    assert_eq!(report.failed.len(), 12, "{report:?}");
    assert!(report.failed.iter().all(|(_, why)| why.contains("full")));
    memory
        .verify()
        .expect("frames that did not move are not left protected");
    for gfn in 0..32 {
        assert_eq!(node_of(&memory, vm, gfn), if gfn < 20 { 1 } else { 0 });
        assert_eq!(memory.read_guest_page(vm, gfn).unwrap(), page_of(gfn));
    }
    memory
        .write_guest_page(vm, 25, &page_of(99))
        .expect("a frame that did not move is still writable");
    memory.destroy_space(vm).unwrap();
    memory.destroy_space(filler).unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.used_pages == 0));
}

#[test]
fn batches_of_pages_migrate_under_running_writers_without_losing_a_write() {
    if !require_kvm("batches_of_pages_migrate_under_running_writers_without_losing_a_write") {
        return;
    }
    move_batches_under_a_sweeper("batch-mover", 9, false);
}

/// The same with page sampling on: guest accesses to a run being moved
/// (unmapped from the guest, see `Memory::move_pages`) and to frames zapped
/// for sampling both arrive as minor faults and go to the sampler.
#[test]
fn batches_migrate_under_running_writers_while_pages_are_sampled() {
    if !require_kvm("batches_migrate_under_running_writers_while_pages_are_sampled") {
        return;
    }
    move_batches_under_a_sweeper("sampled-mover", 11, true);
}

fn move_batches_under_a_sweeper(name: &str, seed: u64, sampling: bool) {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (memory, _handler, vm, guest) = start_sweeper(&kvm, name, seed, sampling);
    let sampler = memory.sampler();
    let first_data = layout::DATA_ADDR / layout::PAGE;
    let (mut moved, mut batches) = (0u64, 0u64);
    let mut gfn = first_data;
    // Batch sizes vary (1 to 600 frames: below and above MOVE_RUN_MAX), and
    // every other batch skips a frame, so runs start and end everywhere.
    let sizes = [1u64, 7, 64, 600, 33, 512, 2];
    while !guest.is_finished() {
        let size = sizes[batches as usize % sizes.len()];
        let end = (gfn + size).min(FRAMES);
        let gfns: Vec<u64> = (gfn..end)
            .filter(|g| batches % 2 == 0 || g % 5 != 0)
            .collect();
        if sampling && batches % 3 == 0 {
            // Zap the next stretch for sampling: some of it is moved
            // before the guest touches it again, some after.
            let next: Vec<u64> = (end..(end + 64).min(FRAMES)).collect();
            memory.zap_frames(vm, &next).unwrap();
        }
        let node = node_of(&memory, vm, gfn);
        let report = memory.move_pages(vm, &gfns, 1 - node).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        moved += report.moved.len() as u64;
        batches += 1;
        if batches.is_multiple_of(16) {
            memory.verify().expect("invariants while batches migrate");
        }
        gfn = if end >= FRAMES { first_data } else { end };
    }
    let out = guest.wait();
    assert!(
        out.checksum_ok(),
        "a write was lost during batched migration: {out:?}"
    );
    assert!(
        moved > 1000 && batches > 10,
        "enough migrations happened under the guest: {moved} pages in {batches} batches"
    );
    if let Some(sampler) = sampler {
        let stats = sampler.stats();
        assert_eq!(stats.errors, 0, "sampler errors: {stats:?}");
    }
    memory.verify().unwrap();
    let stats = memory.space_stats(vm).unwrap();
    assert_eq!(stats.pages_per_node.iter().sum::<u64>(), FRAMES);
    memory.destroy_space(vm).unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.used_pages == 0));
}
