//! Replicas of read-shared pages, really remapped: one copy per node, each VM
//! mapping its node's copy; a write breaks copy-on-write for the writer only;
//! collapses free copies; and, under random sequences of writes (through the
//! guest mapping and the real fault path), merges, replications, collapses,
//! vCPU moves, sampling zaps and rebuilds, `verify()` holds and every frame
//! reads what was last written to it. No KVM needed: the host side of guest
//! RAM (the real-guest runs are in tests/numa_runs.rs).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{guest_read, guest_write};
use disco::faults::FaultHandler;
use disco::memory::{Memory, VmId};
use disco::sharing::{ScanState, ScannerConfig};

const NODES: usize = 4;

fn memory() -> Arc<Memory> {
    let pools: Vec<(usize, u32, u32)> = (0..NODES).map(|n| (n, 0, 1024)).collect();
    Arc::new(Memory::new(&pools).unwrap())
}

#[test]
fn four_vms_on_four_nodes_get_a_replica_each_and_a_write_stays_private() {
    let memory = memory();
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    // Four VMs, memory on node 0, vCPUs on nodes 0..3; frame 3 of each holds
    // the same bytes and is merged onto VM 0's page.
    let vms: Vec<(VmId, usize)> = (0..NODES)
        .map(|n| {
            let (id, base) = memory.create_space(&format!("vm{n}"), 8, 0).unwrap();
            memory.set_cpu_node(id, n).unwrap();
            guest_write(base, 3, 0x5a);
            (id, base)
        })
        .collect();
    for &(id, _) in &vms[1..] {
        memory.share_page(vms[0].0, 3, id, 3).unwrap();
    }
    memory.verify().unwrap();
    assert_eq!(memory.frame_location(vms[2].0, 3).unwrap().copies, vec![0]);

    let made = memory.replicate_page(vms[0].0, 3, &[1, 2, 3]).unwrap();
    assert_eq!(made, 3, "one replica for each of nodes 1, 2, 3");
    memory.verify().unwrap();
    for (n, &(id, base)) in vms.iter().enumerate() {
        let loc = memory.frame_location(id, 3).unwrap();
        assert_eq!(loc.page.node(), n, "vm{n} maps its own node's copy");
        assert_eq!(loc.copies, vec![0, 1, 2, 3]);
        assert!(guest_read(base, 3).iter().all(|&b| b == 0x5a));
    }
    let stats = memory.replica_stats();
    assert_eq!((stats.sets, stats.pages, stats.replicas_made), (1, 4, 3));

    // VM 2 writes its replica: only VM 2 sees the write; the other three keep
    // their replicas (nodes 0, 1, 3) and the old bytes.
    guest_write(vms[2].1, 3, 0x77);
    memory.verify().unwrap();
    assert!(guest_read(vms[2].1, 3).iter().all(|&b| b == 0x77));
    let loc2 = memory.frame_location(vms[2].0, 3).unwrap();
    assert!(!loc2.shared, "the writer's page is private now");
    for n in [0, 1, 3] {
        let (id, base) = vms[n];
        let loc = memory.frame_location(id, 3).unwrap();
        assert_eq!(loc.page.node(), n);
        assert_eq!(
            loc.copies,
            vec![0, 1, 3],
            "vm{n}'s replica set lost only node 2"
        );
        assert!(guest_read(base, 3).iter().all(|&b| b == 0x5a));
    }
    assert_eq!(memory.replica_stats().write_breaks, 1);

    // Collapse to node 1's copy: VMs 0 and 3 now map it; two pages freed.
    let used_before: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
    let dropped = memory.collapse_page(vms[0].0, 3, &[1]).unwrap();
    assert_eq!(dropped, 2);
    memory.verify().unwrap();
    let used_after: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
    assert_eq!(used_before - used_after, 2);
    for n in [0, 1, 3] {
        let loc = memory.frame_location(vms[n].0, 3).unwrap();
        assert_eq!((loc.page.node(), loc.copies.clone()), (1, vec![1]));
        assert!(guest_read(vms[n].1, 3).iter().all(|&b| b == 0x5a));
    }
    assert_eq!(memory.replica_stats().sets, 0);
    for (id, _) in vms {
        memory.destroy_space(id).unwrap();
    }
    memory.verify().unwrap();
    let used: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
    assert_eq!(used, 0);
}

#[test]
fn private_pages_are_not_replicated_and_replicas_are_not_migrated_or_merged_away() {
    let memory = memory();
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let (a, base_a) = memory.create_space("a", 4, 0).unwrap();
    let (b, base_b) = memory.create_space("b", 4, 0).unwrap();
    memory.set_cpu_node(b, 2).unwrap();
    guest_write(base_a, 1, 9);
    guest_write(base_b, 1, 9);
    let err = memory.replicate_page(a, 1, &[2]).unwrap_err();
    assert!(format!("{err:#}").contains("private"), "{err:#}");
    memory.share_page(a, 1, b, 1).unwrap();
    assert_eq!(memory.replicate_page(a, 1, &[2]).unwrap(), 1);
    // A node nobody runs on gets no replica.
    assert_eq!(memory.replicate_page(a, 1, &[3]).unwrap(), 0);
    assert!(
        memory.move_page(b, 1, 0).is_err(),
        "shared pages are not migrated"
    );
    // The scanner sees two frames with equal content on different pages but
    // must not merge a replica away.
    let mut scanner = ScanState::new(
        ScannerConfig::new(u64::MAX, vec![])
            .without_time_rules()
            .merging_on_first_sight(),
    );
    for _ in 0..4 {
        scanner.step(&memory, 64);
    }
    assert_eq!(memory.frame_location(b, 1).unwrap().page.node(), 2);
    assert_eq!(memory.replica_stats().pages, 2);
    memory.verify().unwrap();
}

/// Random sequences over 3 VMs x 12 frames on 4 nodes, with sampling on (so
/// every mapping is registered for minor faults and zapped pages come back
/// through the fault handler, write-protected when they must be).
#[test]
fn random_operations_keep_invariants_and_contents() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const VMS: usize = 3;
    const FRAMES: u64 = 12;
    #[derive(Clone, Debug)]
    enum Op {
        Write {
            vm: usize,
            gfn: u64,
            value: u8,
        },
        Scan {
            pages: u64,
        },
        Replicate {
            vm: usize,
            gfn: u64,
            nodes: Vec<usize>,
        },
        Collapse {
            vm: usize,
            gfn: u64,
            keep: usize,
        },
        MoveCpu {
            vm: usize,
            node: usize,
        },
        Migrate {
            vm: usize,
            gfn: u64,
            node: usize,
        },
        Zap {
            vm: usize,
            gfn: u64,
        },
        Rebuild {
            vm: usize,
        },
    }
    let op = prop_oneof![
        // Mostly one of two non-zero values (zero pages are released, not
        // shared; few values make frames of equal content likely).
        4 => (0..VMS, 0..FRAMES, prop_oneof![1 => Just(0u8), 5 => 1u8..3])
            .prop_map(|(vm, gfn, value)| Op::Write { vm, gfn, value }),
        3 => (1..30u64).prop_map(|pages| Op::Scan { pages }),
        3 => (0..VMS, 0..FRAMES, proptest::collection::vec(0..NODES, 1..4))
            .prop_map(|(vm, gfn, nodes)| Op::Replicate { vm, gfn, nodes }),
        2 => (0..VMS, 0..FRAMES, 0..NODES).prop_map(|(vm, gfn, keep)| Op::Collapse { vm, gfn, keep }),
        2 => (0..VMS, 0..NODES).prop_map(|(vm, node)| Op::MoveCpu { vm, node }),
        2 => (0..VMS, 0..FRAMES, 0..NODES).prop_map(|(vm, gfn, node)| Op::Migrate { vm, gfn, node }),
        2 => (0..VMS, 0..FRAMES).prop_map(|(vm, gfn)| Op::Zap { vm, gfn }),
        1 => (0..VMS).prop_map(|vm| Op::Rebuild { vm }),
    ];
    // A fixed seed: the coverage checks at the end (a write to a replica,
    // ...) failed now and then with random ones.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 160,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    // What the cases exercised, summed (checked at the end so the property
    // cannot pass by never reaching the interesting states).
    let made = std::cell::Cell::new(0u64);
    let breaks = std::cell::Cell::new(0u64); // writes to a replicated frame
    let minor = std::cell::Cell::new(0u64);
    runner
        .run(&proptest::collection::vec(op, 1..80), |ops| {
            let memory = memory();
            let sampler = memory.enable_sampling().unwrap();
            let handler = FaultHandler::start(memory.clone()).unwrap();
            let mut spaces: Vec<(VmId, usize)> = (0..VMS)
                .map(|v| memory.create_space(&format!("p{v}"), FRAMES, 0).unwrap())
                .collect();
            let mut model: Vec<BTreeMap<u64, u8>> = vec![BTreeMap::new(); VMS];
            let mut scanner = ScanState::new(
                ScannerConfig::new(u64::MAX, vec![])
                    .without_time_rules()
                    .merging_on_first_sight(),
            );
            for op in ops {
                match op {
                    Op::Write { vm, gfn, value } => {
                        let replicated = memory
                            .frame_location(spaces[vm].0, gfn)
                            .is_some_and(|l| l.copies.len() > 1);
                        breaks.set(breaks.get() + replicated as u64);
                        guest_write(spaces[vm].1, gfn, value);
                        model[vm].insert(gfn, value);
                    }
                    Op::Scan { pages } => scanner.step(&memory, pages),
                    Op::Replicate { vm, gfn, nodes } => {
                        let shared = memory
                            .frame_location(spaces[vm].0, gfn)
                            .is_some_and(|l| l.shared);
                        let res = memory.replicate_page(spaces[vm].0, gfn, &nodes);
                        prop_assert_eq!(res.is_ok(), shared, "{:?}", res);
                    }
                    Op::Collapse { vm, gfn, keep } => {
                        let loc = memory.frame_location(spaces[vm].0, gfn).unwrap();
                        let res = memory.collapse_page(spaces[vm].0, gfn, &[keep]);
                        prop_assert_eq!(res.is_ok(), loc.copies.contains(&keep), "{:?}", res);
                    }
                    Op::MoveCpu { vm, node } => memory.set_cpu_node(spaces[vm].0, node).unwrap(),
                    Op::Migrate { vm, gfn, node } => {
                        // Private and shared pages move (shared ones for
                        // every owner); replicated ones do not.
                        let replicated = memory
                            .frame_location(spaces[vm].0, gfn)
                            .is_some_and(|l| l.copies.len() > 1);
                        let res = memory.move_page(spaces[vm].0, gfn, node);
                        prop_assert_eq!(res.is_ok(), !replicated, "{:?}", res);
                    }
                    Op::Zap { vm, gfn } => {
                        memory.zap_frames(spaces[vm].0, &[gfn]).unwrap();
                    }
                    Op::Rebuild { vm } => {
                        memory.destroy_space(spaces[vm].0).unwrap();
                        spaces[vm] = memory.create_space("again", FRAMES, 0).unwrap();
                        model[vm].clear();
                    }
                }
                memory
                    .verify()
                    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                for (v, &(id, base)) in spaces.iter().enumerate() {
                    for gfn in 0..FRAMES {
                        let want = model[v].get(&gfn).copied().unwrap_or(0);
                        let page = memory.read_guest_page(id, gfn).unwrap();
                        prop_assert!(
                            page.iter().all(|&x| x == want),
                            "vm {} frame {} lost its content",
                            v,
                            gfn
                        );
                        prop_assert!(
                            guest_read(base, gfn).iter().all(|&x| x == want),
                            "vm {} frame {} reads wrong through its mapping",
                            v,
                            gfn
                        );
                    }
                }
            }
            for (id, _) in spaces {
                memory.destroy_space(id).unwrap();
            }
            memory
                .verify()
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            let used: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
            prop_assert_eq!(used, 0, "no machine page leaked");
            let r = memory.replica_stats();
            made.set(made.get() + r.replicas_made);
            let st = sampler.stats();
            minor.set(minor.get() + st.unsolicited + st.samples + st.unattributed);
            drop(handler);
            Ok(())
        })
        .unwrap();
    assert!(made.get() > 0, "no case made a replica");
    assert!(breaks.get() > 0, "no case wrote to a replica");
    assert!(
        minor.get() > 0,
        "no zapped page came back through a minor fault"
    );
    eprintln!(
        "random operations: {} replicas made, {} replica write breaks, {} minor faults",
        made.get(),
        breaks.get(),
        minor.get()
    );
}
