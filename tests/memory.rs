//! The mapper under random sequences of operations: after every step
//! `Memory::verify` holds (pmap, memmap, pools and the kernel's real host
//! mappings agree) and every guest frame reads, through the guest's own host
//! mapping, exactly what the model says it should. No KVM needed: this is the
//! host side of guest RAM, really remapped.

use std::collections::BTreeMap;

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
        let memory = Memory::new(&[(0, 0, 256), (1, 0, 256)]).unwrap();
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

        for id in ids {
            memory.destroy_space(id).unwrap();
        }
        memory.verify().unwrap();
        let used: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
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
