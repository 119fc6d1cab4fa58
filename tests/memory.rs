//! The mapper under random sequences of operations: after every step
//! `Memory::verify` holds (pmap, memmap, pools and the kernel's real host
//! mappings agree) and every guest frame reads, through the guest's own host
//! mapping, exactly what the model says it should. No KVM needed: this is the
//! host side of guest RAM, really remapped.

use std::collections::BTreeMap;

mod common;

use disco::memory::{Memory, VmId};
use disco::PAGE_SIZE;
use proptest::prelude::*;

const FRAMES: u64 = 12;
const VMS: usize = 3;
const NODES: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    Write {
        vm: usize,
        gfn: u64,
        byte: u8,
    },
    Map {
        vm: usize,
        gfn: u64,
        node: usize,
    },
    Unmap {
        vm: usize,
        gfn: u64,
    },
    Move {
        vm: usize,
        gfn: u64,
        node: usize,
    },
    /// `move_pages` of frames `first..first+len` (may run past the space).
    MoveBatch {
        vm: usize,
        first: u64,
        len: u64,
        node: usize,
    },
    Share {
        src: usize,
        sgfn: u64,
        dst: usize,
        dgfn: u64,
    },
    Rebuild {
        vm: usize,
        node: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..VMS;
    let gfn = 0..FRAMES;
    let node = 0..NODES;
    prop_oneof![
        3 => (vm.clone(), gfn.clone(), any::<u8>()).prop_map(|(vm, gfn, byte)| Op::Write { vm, gfn, byte }),
        2 => (vm.clone(), gfn.clone(), node.clone()).prop_map(|(vm, gfn, node)| Op::Map { vm, gfn, node }),
        2 => (vm.clone(), gfn.clone()).prop_map(|(vm, gfn)| Op::Unmap { vm, gfn }),
        2 => (vm.clone(), gfn.clone(), node.clone()).prop_map(|(vm, gfn, node)| Op::Move { vm, gfn, node }),
        2 => (vm.clone(), gfn.clone(), 1..FRAMES + 2, node.clone())
            .prop_map(|(vm, first, len, node)| Op::MoveBatch { vm, first, len, node }),
        2 => (vm.clone(), gfn.clone(), vm.clone(), gfn.clone())
            .prop_map(|(src, sgfn, dst, dgfn)| Op::Share { src, sgfn, dst, dgfn }),
        1 => (vm, node).prop_map(|(vm, node)| Op::Rebuild { vm, node }),
    ]
}

/// What each frame must contain: None = unmapped, Some(page) = its bytes.
type Model = Vec<BTreeMap<u64, Option<Vec<u8>>>>;

fn pattern(vm: usize, gfn: u64, byte: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| byte ^ (i as u8).wrapping_mul(31) ^ (vm as u8) ^ (gfn as u8).rotate_left(3))
        .collect()
}

fn check(memory: &Memory, ids: &[VmId], model: &Model) {
    memory.verify().expect("invariants hold");
    for (v, frames) in model.iter().enumerate() {
        for (&gfn, want) in frames {
            let got = memory.read_guest_page(ids[v], gfn);
            match want {
                Some(bytes) => assert_eq!(
                    got.as_deref().ok(),
                    Some(bytes.as_slice()),
                    "vm {v} gfn {gfn} reads the wrong content"
                ),
                None => assert!(got.is_err(), "vm {v} gfn {gfn} should be unmapped"),
            }
        }
    }
}

fn fresh_model_vm() -> BTreeMap<u64, Option<Vec<u8>>> {
    (0..FRAMES)
        .map(|g| (g, Some(vec![0u8; PAGE_SIZE])))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn mapper_keeps_invariants_and_contents(ops in proptest::collection::vec(op(), 1..60)) {
        // Pools exactly as large as all frames together: the never-used
        // tail runs out, so fresh maps must come from freed pages, warm ones
        // (migration's old pages, stale content) included; a small warm cap
        // makes frees beyond it punch. (Plus one page: `move_page` to the
        // frame's own node still copies.)
        let pages = (VMS as u64 * FRAMES) as u32 + 1;
        let memory = Memory::new(&[(0, 0, pages), (1, 0, pages)]).unwrap();
        memory.set_warm_cap(8 * PAGE_SIZE).unwrap();
        let mut ids: Vec<VmId> = (0..VMS)
            .map(|v| memory.create_space(&format!("vm{v}"), FRAMES, v % NODES).unwrap().0)
            .collect();
        let mut model: Model = (0..VMS).map(|_| fresh_model_vm()).collect();
        check(&memory, &ids, &model);

        for op in ops {
            match op {
                Op::Write { vm, gfn, byte } => {
                    let entry = memory.lookup(ids[vm], gfn).unwrap();
                    let data = pattern(vm, gfn, byte);
                    let res = memory.write_guest_page(ids[vm], gfn, &data);
                    match entry {
                        Some(e) if !e.flags.write_protected => {
                            res.unwrap();
                            model[vm].insert(gfn, Some(data));
                        }
                        _ => prop_assert!(res.is_err(), "write to an unmapped or protected frame must fail"),
                    }
                }
                Op::Map { vm, gfn, node } => {
                    let res = memory.map_page(ids[vm], gfn, node);
                    if model[vm][&gfn].is_none() {
                        let page = res.unwrap();
                        prop_assert_eq!(page.node(), node);
                        model[vm].insert(gfn, Some(vec![0u8; PAGE_SIZE]));
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Unmap { vm, gfn } => {
                    let res = memory.unmap_page(ids[vm], gfn);
                    if model[vm][&gfn].is_some() {
                        res.unwrap();
                        model[vm].insert(gfn, None);
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Move { vm, gfn, node } => {
                    // A shared page moves for all its owners.
                    let res = memory.move_page(ids[vm], gfn, node);
                    if model[vm][&gfn].is_some() {
                        prop_assert_eq!(res.unwrap().node(), node);
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::MoveBatch { vm, first, len, node } => {
                    let gfns: Vec<u64> = (first..first + len).collect();
                    let report = memory.move_pages(ids[vm], &gfns, node).unwrap();
                    prop_assert_eq!(
                        report.moved.len() + report.unchanged.len() + report.failed.len(),
                        gfns.len(),
                        "every frame is accounted for once"
                    );
                    for &gfn in &gfns {
                        let failed = report.failed.iter().any(|(g, _)| *g == gfn);
                        match model[vm].get(&gfn) {
                            Some(Some(_)) => {
                                prop_assert!(!failed, "mapped frame {} failed: {:?}", gfn, report.failed);
                                let e = memory.lookup(ids[vm], gfn).unwrap().unwrap();
                                prop_assert_eq!(e.page.node(), node);
                            }
                            _ => prop_assert!(failed, "unmapped or outside frame {} must fail", gfn),
                        }
                    }
                }
                Op::Share { src, sgfn, dst, dgfn } => {
                    let res = memory.share_page(ids[src], sgfn, ids[dst], dgfn);
                    let src_content = model[src][&sgfn].clone();
                    if src_content.is_some() && (src, sgfn) != (dst, dgfn) {
                        res.unwrap();
                        model[dst].insert(dgfn, src_content);
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Rebuild { vm, node } => {
                    memory.destroy_space(ids[vm]).unwrap();
                    ids[vm] = memory.create_space("again", FRAMES, node).unwrap().0;
                    model[vm] = fresh_model_vm();
                }
            }
            check(&memory, &ids, &model);
        }

        let used = common::destroy_all(&memory, ids).unwrap();
        prop_assert_eq!(used, 0, "every machine page is returned once all VMs are gone");
    }
}

#[test]
fn verify_catches_a_mapping_changed_behind_the_mappers_back() {
    let memory = Memory::new(&[(0, 0, 64)]).unwrap();
    let (vm, base) = memory.create_space("victim", 4, 0).unwrap();
    memory.verify().unwrap();
    // Replace frame 2 with anonymous memory without telling the mapper.
    // SAFETY: the range belongs to the space created above.
    let ret = unsafe {
        libc::mmap(
            (base + 2 * PAGE_SIZE) as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_ne!(ret, libc::MAP_FAILED);
    let err = memory.verify().unwrap_err().to_string();
    assert!(
        err.contains("gfn 0x2"),
        "verify names the broken frame: {err}"
    );
    memory.destroy_space(vm).unwrap();
}

#[test]
fn freed_pages_go_back_to_the_host_and_read_as_zero() {
    let memory = Memory::new(&[(0, 0, 64)]).unwrap();
    let (vm, _) = memory.create_space("a", 8, 0).unwrap();
    for gfn in 0..8 {
        memory
            .write_guest_page(vm, gfn, &vec![0xab; PAGE_SIZE])
            .unwrap();
    }
    let resident = memory.pool_stats()[0].resident_bytes;
    assert!(
        resident >= 8 * PAGE_SIZE as u64,
        "written pages are resident: {resident}"
    );
    memory.destroy_space(vm).unwrap();
    assert_eq!(
        memory.pool_stats()[0].resident_bytes,
        0,
        "holes punched on free"
    );
    let (vm, _) = memory.create_space("b", 8, 0).unwrap();
    for gfn in 0..8 {
        assert!(memory
            .read_guest_page(vm, gfn)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
    memory.verify().unwrap();
}

#[test]
fn a_full_pool_is_a_clear_error_and_leaks_nothing() {
    let memory = Memory::new(&[(0, 0, 16)]).unwrap();
    let (_a, _) = memory.create_space("a", 12, 0).unwrap();
    let err = memory.create_space("b", 8, 0).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("pool of node 0 is full"), "{msg}");
    memory.verify().unwrap();
    assert_eq!(memory.pool_stats()[0].used_pages, 12);
}

/// Reads frame `gfn` through the guest's own host mapping (what a vCPU sees).
fn guest_view(base: usize, gfn: u64) -> Vec<u8> {
    // SAFETY: a mapped frame of a live space, no guest running.
    unsafe { std::slice::from_raw_parts((base + gfn as usize * PAGE_SIZE) as *const u8, PAGE_SIZE) }
        .to_vec()
}

fn marker(gfn: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, chunk) in page.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(0x5741_524d_0000_0000 | (gfn << 16) | i as u64).to_le_bytes());
    }
    page
}

#[test]
fn warm_pages_never_reach_fresh_guest_ram() {
    const FRAMES: u64 = 32;
    // Pool 0 holds exactly one space: once the space has moved away, its
    // free pages are all warm (stale markers) and there is no untouched
    // page left, so fresh RAM can only be made of those warm pages.
    let memory = Memory::new(&[(0, 0, FRAMES as u32), (1, 0, 256)]).unwrap();
    let (a, base_a) = memory.create_space("a", FRAMES, 0).unwrap();
    for gfn in 0..FRAMES {
        memory.write_guest_page(a, gfn, &marker(gfn)).unwrap();
        assert_eq!(guest_view(base_a, gfn), marker(gfn));
    }
    let gfns: Vec<u64> = (0..FRAMES).collect();
    let report = memory.move_pages(a, &gfns, 1).unwrap();
    assert_eq!(report.moved.len(), FRAMES as usize, "{report:?}");
    let pool = &memory.pool_stats()[0];
    assert_eq!(
        (pool.used_pages, pool.warm_pages),
        (0, FRAMES as u32),
        "the moved-away pages are free and warm: {pool:?}"
    );
    assert!(
        pool.resident_bytes >= FRAMES * PAGE_SIZE as u64,
        "warm pages are resident (not punched): {pool:?}"
    );
    memory.verify().unwrap();

    // Fresh guest RAM on node 0: a whole space, then single frames.
    let (b, base_b) = memory.create_space("b", FRAMES, 0).unwrap();
    for gfn in 0..FRAMES {
        assert!(
            guest_view(base_b, gfn).iter().all(|&x| x == 0),
            "fresh frame {gfn} shows stale data through the guest mapping"
        );
    }
    let pool = &memory.pool_stats()[0];
    assert_eq!(
        (pool.used_pages, pool.warm_pages),
        (FRAMES as u32, 0),
        "{pool:?}"
    );
    memory.verify().unwrap();

    // Warm again (b moves away), then frames mapped one by one.
    for gfn in 0..FRAMES {
        memory.write_guest_page(b, gfn, &marker(gfn + 100)).unwrap();
    }
    memory.move_pages(b, &gfns, 1).unwrap();
    assert_eq!(memory.pool_stats()[0].warm_pages, FRAMES as u32);
    let (c, base_c) = memory.create_space("c", FRAMES, 1).unwrap();
    for gfn in 0..FRAMES {
        memory.unmap_page(c, gfn).unwrap();
        memory.map_page(c, gfn, 0).unwrap();
        assert!(
            guest_view(base_c, gfn).iter().all(|&x| x == 0),
            "frame {gfn} mapped fresh shows stale data"
        );
    }
    memory.verify().unwrap();
    // The data that did move is intact.
    for gfn in 0..FRAMES {
        assert_eq!(guest_view(base_a, gfn), marker(gfn));
        assert_eq!(guest_view(base_b, gfn), marker(gfn + 100));
    }
    for vm in [a, b, c] {
        memory.destroy_space(vm).unwrap();
    }
    memory.verify().unwrap();
}

#[test]
fn copy_targets_reuse_warm_pages_up_to_the_cap() {
    const FRAMES: u64 = 48;
    const CAP: u32 = 16;
    let memory = Memory::new(&[(0, 0, 256), (1, 0, 256)]).unwrap();
    memory.set_warm_cap(CAP as usize * PAGE_SIZE).unwrap();
    let (vm, base) = memory.create_space("a", FRAMES, 0).unwrap();
    for gfn in 0..FRAMES {
        memory.write_guest_page(vm, gfn, &marker(gfn)).unwrap();
    }
    let gfns: Vec<u64> = (0..FRAMES).collect();
    memory.move_pages(vm, &gfns, 1).unwrap();
    let pool = memory.pool_stats()[0].clone();
    assert_eq!(pool.warm_pages, CAP, "the cap holds: {pool:?}");
    assert_eq!(
        pool.resident_bytes,
        CAP as u64 * PAGE_SIZE as u64,
        "only the warm pages stay resident, the rest was punched: {pool:?}"
    );
    memory.verify().unwrap();

    // Back to node 0: the first CAP targets are the warm pages.
    let back: Vec<u64> = (0..CAP as u64).collect();
    let report = memory.move_pages(vm, &back, 0).unwrap();
    assert_eq!(report.moved.len(), CAP as usize);
    let pool = memory.pool_stats()[0].clone();
    assert_eq!(
        (pool.warm_reused_pages, pool.warm_pages),
        (CAP as u64, 0),
        "{pool:?}"
    );
    // Single-page migration reuses warm pages too: node 1 got CAP warm
    // pages from the move back.
    assert_eq!(memory.pool_stats()[1].warm_pages, CAP);
    memory.move_page(vm, 0, 1).unwrap();
    assert_eq!(memory.pool_stats()[1].warm_reused_pages, 1);
    memory.verify().unwrap();
    for gfn in 0..FRAMES {
        assert_eq!(guest_view(base, gfn), marker(gfn), "frame {gfn}");
    }

    // Lowering the cap and releasing punch warm pages at once.
    memory.set_warm_cap(4 * PAGE_SIZE).unwrap();
    assert!(memory.pool_stats().iter().all(|p| p.warm_pages <= 4));
    memory.verify().unwrap();
    memory.destroy_space(vm).unwrap();
    memory.release_warm().unwrap();
    for p in memory.pool_stats() {
        assert_eq!((p.warm_pages, p.resident_bytes), (0, 0), "{p:?}");
    }
    memory.verify().unwrap();
}
