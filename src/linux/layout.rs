//! The guest-physical layout of a Linux VM, its e820 map and its NUMA plan.
//!
//! ```text
//! 0x0000_0500  boot GDT                      (null, null, code 0x10, data 0x18, TSS 0x20)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_9000  boot page tables: PML4, PDPT, 4 page directories (identity map of 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line           (MAX_CMDLINE bytes)
//! 0x0009_fc00  EBDA .. 1 MiB: reserved in the e820 map
//! 0x000e_0000  ACPI: RSDP, then XSDT, MADT, SRAT, SLIT, FADT, DSDT
//! 0x0010_0000  RAM; an ELF vmlinux loads at its physical addresses
//!              (16 MiB for Debian), a bzImage at 1 MiB;
//!              the initramfs at the top of RAM
//! 0xc000_0000  end of the largest RAM (3 GiB): device hole
//! 0xd000_0000  virtio-mmio devices, 4 KiB each, IRQ VIRTIO_IRQ_BASE + i
//! 0xfec0_0000  IOAPIC (KVM in-kernel)
//! 0xfee0_0000  local APICs (KVM in-kernel)
//! ```
//!
//! Guest RAM is one range `0..size` of the VM's guest space in the monitor's
//! [`crate::memory::Memory`] (memory slot 0): a guest frame number is its
//! guest-physical address / 4 KiB, as for micro-guests.

use crate::PAGE_SIZE;

pub const BOOT_GDT: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xA000;
pub const PD: u64 = 0xB000;
pub const CMDLINE: u64 = 0x20000;
/// Longest kernel command line (Linux x86's COMMAND_LINE_SIZE).
pub use crate::config::linux::{split_ram, GuestNode, MAX_CMDLINE};
// The config's largest Linux RAM is this layout's RAM below the device hole.
const _: () = assert!(RAM_LIMIT >> 20 == crate::config::linux::MAX_MEMORY_MIB);
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xE_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIGH_RAM: u64 = 0x10_0000;
/// RAM must end below this (the 3 GiB device hole).
pub const RAM_LIMIT: u64 = 0xC000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices a VM may have.
pub const MAX_VIRTIO: usize = 8;
/// IRQ (GSI) of the first virtio-mmio device; the serial port has IRQ 4.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const SERIAL_IRQ: u32 = 4;
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One e820 entry: `[addr, addr + size)` of type `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map of a VM with `ram` bytes of RAM: low RAM below the EBDA,
/// the reserved BIOS area (EBDA, ACPI tables, 1 MiB boundary), then RAM.
pub fn e820_map(ram: u64) -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_RAM - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_RAM,
            size: ram - HIGH_RAM,
            kind: E820_RAM,
        },
    ]
}

/// The guest's NUMA topology: one guest node per distinct topology node of
/// the vCPUs (in ascending order), RAM split evenly between them in 2 MiB
/// multiples (the last takes the rest), and each vCPU's proximity domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaPlan {
    pub nodes: Vec<GuestNode>,
    /// Proximity domain (index into `nodes`) of each vCPU.
    pub vcpu_domains: Vec<u32>,
    /// SLIT distances between the guest nodes (10 on the diagonal).
    pub distances: Vec<Vec<u8>>,
}

impl NumaPlan {
    /// Plans `ram` bytes for vCPUs on `vcpu_nodes`; `distance(a, b)` gives
    /// the topology's distance between topology nodes.
    pub fn new(vcpu_nodes: &[usize], ram: u64, distance: impl Fn(usize, usize) -> u32) -> NumaPlan {
        let nodes = split_ram(vcpu_nodes, ram);
        let topo: Vec<usize> = nodes.iter().map(|n| n.topology_node).collect();
        let vcpu_domains = vcpu_nodes
            .iter()
            .map(|v| topo.iter().position(|t| t == v).unwrap() as u32)
            .collect();
        let distances = topo
            .iter()
            .map(|&a| {
                topo.iter()
                    .map(|&b| {
                        if a == b {
                            10
                        } else {
                            distance(a, b).clamp(11, 254) as u8
                        }
                    })
                    .collect()
            })
            .collect();
        NumaPlan {
            nodes,
            vcpu_domains,
            distances,
        }
    }

    /// The guest frames of guest node `i`.
    pub fn frames(&self, i: usize) -> std::ops::Range<u64> {
        let n = &self.nodes[i];
        n.mem_start / PAGE_SIZE as u64..(n.mem_start + n.mem_len) / PAGE_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let map = e820_map(256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIGH_RAM - EBDA_START));
        assert!(map.iter().any(|e| e.kind == E820_RESERVED
            && e.addr <= ACPI_START
            && e.addr + e.size >= ACPI_END));
    }

    #[test]
    fn numa_plan_splits_memory_by_vcpu_nodes() {
        let plan = NumaPlan::new(&[3, 1, 3], 200 << 20, |a, b| if a == b { 10 } else { 21 });
        assert_eq!(plan.nodes.len(), 2);
        assert_eq!(plan.nodes[0].topology_node, 1);
        assert_eq!(plan.nodes[1].topology_node, 3);
        assert_eq!(plan.nodes[0].mem_start, 0);
        assert_eq!(plan.nodes[0].mem_len, 100 << 20);
        assert_eq!(plan.nodes[1].mem_start + plan.nodes[1].mem_len, 200 << 20);
        assert_eq!(plan.vcpu_domains, vec![1, 0, 1]);
        assert_eq!(plan.distances, vec![vec![10, 21], vec![21, 10]]);
    }
}
