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

#[test]
fn pages_migrate_under_running_writers_without_losing_a_write() {
    if !require_kvm("pages_migrate_under_running_writers_without_losing_a_write") {
        return;
    }
    const FRAMES: u64 = 2048; // 8 MiB
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Arc::new(Memory::new(&[(0, 0, 8192), (1, 0, 8192)]).unwrap());
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    let (vm, base) = memory.create_space("mover", FRAMES, 0).unwrap();
    let spec = MicroVmSpec {
        name: "mover".into(),
        vcpus: (0..2)
            .map(|_| VcpuPlacement {
                node: 1,
                host_cpus: vec![],
            })
            .collect(),
        workload: Workload::Sweep {
            seed: 5,
            passes: 400,
        },
        time_limit: Duration::from_secs(120),
    };
    let ram = GuestRam {
        host_addr: base,
        size: FRAMES as usize * PAGE_SIZE,
    };
    let mut guest = MicroVm::create(&kvm, spec, ram).unwrap();
    guest.start().unwrap();
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
