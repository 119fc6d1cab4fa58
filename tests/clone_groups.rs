//! Clones built from one image under random sequences of operations: the
//! memmap's clone groups (a page every clone maps at one frame names the
//! group, not each clone) must stay exact through copy-on-write breaks,
//! writes, merges (also a clone's copy merged back onto its group's page),
//! migrations, unmaps, remaps and removals. After every step
//! `Memory::verify` holds (pmap, memmap with its groups, pools and the
//! kernel's real host mappings agree) and every frame reads, through the
//! mapper, exactly what the model says. No KVM needed: the host side of
//! guest RAM, really remapped and really write-protected.

mod common;

use disco::memory::{ImagePages, Memory, PageImage, SpaceRequest, VmId};
use disco::PAGE_SIZE;
use proptest::prelude::*;

const FRAMES: u64 = 16;
const NODES: usize = 2;
/// Live spaces at most (a clone op beyond this is skipped).
const MAX_SPACES: usize = 8;

#[derive(Clone, Debug)]
enum Op {
    /// `count` clones of the image, clone k on `nodes[k % 2]`.
    Clone {
        count: usize,
        nodes: [usize; 2],
    },
    /// A guest write: copy-on-write break first if the frame is protected.
    Write {
        vm: usize,
        gfn: u64,
        byte: u8,
    },
    /// Only the copy-on-write break (the fault handler's part).
    Break {
        vm: usize,
        gfn: u64,
    },
    /// `dst`'s frame maps `src`'s page (the scanner's merge).
    Merge {
        src: usize,
        sgfn: u64,
        dst: usize,
        dgfn: u64,
    },
    Move {
        vm: usize,
        gfn: u64,
        node: usize,
    },
    Unmap {
        vm: usize,
        gfn: u64,
    },
    Map {
        vm: usize,
        gfn: u64,
        node: usize,
    },
    Remove {
        vm: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..MAX_SPACES;
    let gfn = 0..FRAMES;
    let node = 0..NODES;
    prop_oneof![
        2 => (1..4usize, node.clone(), node.clone())
            .prop_map(|(count, a, b)| Op::Clone { count, nodes: [a, b] }),
        3 => (vm.clone(), gfn.clone(), any::<u8>()).prop_map(|(vm, gfn, byte)| Op::Write { vm, gfn, byte }),
        3 => (vm.clone(), gfn.clone()).prop_map(|(vm, gfn)| Op::Break { vm, gfn }),
        // Same frame in two clones half the time: a broken copy merged
        // back onto its group's page.
        3 => (vm.clone(), gfn.clone(), vm.clone(), gfn.clone(), any::<bool>())
            .prop_map(|(src, sgfn, dst, dgfn, same)| Op::Merge {
                src, sgfn, dst, dgfn: if same { sgfn } else { dgfn },
            }),
        2 => (vm.clone(), gfn.clone(), node.clone()).prop_map(|(vm, gfn, node)| Op::Move { vm, gfn, node }),
        1 => (vm.clone(), gfn.clone()).prop_map(|(vm, gfn)| Op::Unmap { vm, gfn }),
        1 => (vm.clone(), gfn.clone(), node.clone()).prop_map(|(vm, gfn, node)| Op::Map { vm, gfn, node }),
        1 => vm.prop_map(|vm| Op::Remove { vm }),
    ]
}

fn pattern(tag: u64, byte: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| byte ^ (i as u8).wrapping_mul(29) ^ (tag as u8).rotate_left(2))
        .collect()
}

/// The image: frames 0..FRAMES-3 each on a page of its own, except that
/// frames 2 and 11 share one page (a page named by two frames); the last
/// three frames are left out (fresh, zero pages in every clone).
fn image() -> Vec<PageImage> {
    let mut pages: Vec<PageImage> = (0..FRAMES - 3)
        .filter(|&g| g != 11)
        .map(|g| PageImage {
            frames: if g == 2 { vec![2, 11] } else { vec![g] },
            bytes: pattern(g, 0xa5),
        })
        .collect();
    pages.sort_by_key(|p| p.frames[0]);
    pages
}

/// A live space and what each of its frames holds (`None`: unmapped).
struct Space {
    id: VmId,
    base: usize,
    frames: Vec<Option<Vec<u8>>>,
}

fn clone_frames() -> Vec<Option<Vec<u8>>> {
    let mut frames = vec![Some(vec![0u8; PAGE_SIZE]); FRAMES as usize];
    for p in image() {
        for &g in &p.frames {
            frames[g as usize] = Some(p.bytes.clone());
        }
    }
    frames
}

fn check(memory: &Memory, spaces: &[Space]) -> Result<(), TestCaseError> {
    if let Err(e) = memory.verify() {
        return Err(TestCaseError::fail(format!("{e:#}")));
    }
    for s in spaces {
        for (gfn, want) in s.frames.iter().enumerate() {
            let got = memory.read_guest_page(s.id, gfn as u64);
            match want {
                Some(bytes) => prop_assert_eq!(
                    got.as_deref().ok(),
                    Some(bytes.as_slice()),
                    "vm {} gfn {} reads the wrong content",
                    s.id,
                    gfn
                ),
                None => prop_assert!(got.is_err(), "vm {} gfn {} should be unmapped", s.id, gfn),
            }
        }
    }
    Ok(())
}

/// Gives `(vm, gfn)` a private page if it is write-protected, as the fault
/// handler does on a guest write.
fn break_cow(memory: &Memory, s: &Space, gfn: u64) {
    let protected = memory
        .lookup(s.id, gfn)
        .unwrap()
        .is_some_and(|e| e.flags.write_protected);
    if protected {
        memory
            .resolve_write_fault(s.base + gfn as usize * PAGE_SIZE)
            .unwrap();
        let e = memory.lookup(s.id, gfn).unwrap().unwrap();
        assert!(!e.flags.write_protected && !e.flags.shared);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn clone_groups_stay_exact(ops in proptest::collection::vec(op(), 1..50)) {
        let pages = (MAX_SPACES as u64 * FRAMES * 2) as u32;
        let memory = Memory::new(&[(0, 0, pages), (1, 0, pages)]).unwrap();
        let mut spaces: Vec<Space> = Vec::new();
        let pick = |spaces: &Vec<Space>, vm: usize| (!spaces.is_empty()).then(|| vm % spaces.len());
        // Every case starts with a group of three clones on node 0.
        let first = Op::Clone { count: 3, nodes: [0, 0] };
        for op in std::iter::once(first).chain(ops) {
            match op {
                Op::Clone { count, nodes } => {
                    if spaces.len() + count > MAX_SPACES {
                        continue;
                    }
                    let requests: Vec<SpaceRequest> = (0..count)
                        .map(|k| SpaceRequest {
                            name: format!("clone{k}"),
                            domain: "default".into(),
                            node: nodes[k % 2],
                        })
                        .collect();
                    let mut source = ImagePages::new(image().into_iter().map(Ok));
                    let load = memory
                        .create_spaces_from_image(FRAMES, &requests, &mut source)
                        .unwrap();
                    // One copy of the image per node with clones.
                    for node in 0..NODES {
                        let here = requests.iter().any(|r| r.node == node);
                        prop_assert_eq!(load.pages_per_node[node], if here { image().len() as u64 } else { 0 });
                    }
                    for (id, base) in load.spaces {
                        spaces.push(Space { id, base, frames: clone_frames() });
                    }
                }
                Op::Write { vm, gfn, byte } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    let s = &mut spaces[i];
                    if s.frames[gfn as usize].is_none() {
                        continue;
                    }
                    break_cow(&memory, s, gfn);
                    let data = pattern(gfn + 100 * s.id as u64, byte);
                    memory.write_guest_page(s.id, gfn, &data).unwrap();
                    s.frames[gfn as usize] = Some(data);
                }
                Op::Break { vm, gfn } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    if spaces[i].frames[gfn as usize].is_some() {
                        break_cow(&memory, &spaces[i], gfn);
                    }
                }
                Op::Merge { src, sgfn, dst, dgfn } => {
                    let (Some(a), Some(b)) = (pick(&spaces, src), pick(&spaces, dst)) else { continue };
                    let content = spaces[a].frames[sgfn as usize].clone();
                    let res = memory.share_page(spaces[a].id, sgfn, spaces[b].id, dgfn);
                    if content.is_some() && (a, sgfn) != (b, dgfn) {
                        res.unwrap();
                        spaces[b].frames[dgfn as usize] = content;
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Move { vm, gfn, node } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    let res = memory.move_page(spaces[i].id, gfn, node);
                    prop_assert_eq!(res.is_ok(), spaces[i].frames[gfn as usize].is_some());
                }
                Op::Unmap { vm, gfn } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    let res = memory.unmap_page(spaces[i].id, gfn);
                    prop_assert_eq!(res.is_ok(), spaces[i].frames[gfn as usize].is_some());
                    spaces[i].frames[gfn as usize] = None;
                }
                Op::Map { vm, gfn, node } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    let res = memory.map_page(spaces[i].id, gfn, node);
                    if spaces[i].frames[gfn as usize].is_none() {
                        res.unwrap();
                        spaces[i].frames[gfn as usize] = Some(vec![0u8; PAGE_SIZE]);
                    } else {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Remove { vm } => {
                    let Some(i) = pick(&spaces, vm) else { continue };
                    memory.destroy_space(spaces.remove(i).id).unwrap();
                }
            }
            check(&memory, &spaces)?;
        }
        let used = common::destroy_all(&memory, spaces.into_iter().map(|s| s.id)).unwrap();
        prop_assert_eq!(used, 0, "every machine page is returned once all clones are gone");
    }
}

/// A clone group costs no record per (page, clone): 16 clones of the image
/// leave the memmap's side table empty (only the page named by two frames
/// has one owner record per clone there), and a clone's breaks are bits.
#[test]
fn clones_cost_no_owner_record_per_page() {
    let memory = Memory::new(&[(0, 0, 4096)]).unwrap();
    let requests: Vec<SpaceRequest> = (0..16)
        .map(|k| SpaceRequest {
            name: format!("c{k}"),
            domain: "default".into(),
            node: 0,
        })
        .collect();
    let mut source = ImagePages::new(image().into_iter().map(Ok));
    let load = memory
        .create_spaces_from_image(FRAMES, &requests, &mut source)
        .unwrap();
    memory.verify().unwrap();
    let (groups, members) = memory.clone_groups();
    assert_eq!((groups, members), (1, 16));
    // Each image page once; every image frame of every clone maps it.
    let used: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
    assert_eq!(used as u64, image().len() as u64 + 16 * 3);
    let stats = memory.sharing_stats();
    assert_eq!(stats.shared_machine_pages, image().len() as u64);
    assert_eq!(stats.sharing_frames, 16 * (FRAMES - 3));
    for &(id, _) in &load.spaces {
        memory.destroy_space(id).unwrap();
        memory.verify().unwrap();
    }
    assert_eq!(
        memory.clone_groups(),
        (0, 0),
        "the group goes with its members"
    );
}
