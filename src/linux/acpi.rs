//! ACPI tables for a Linux guest: RSDP, XSDT, MADT (local APICs, IOAPIC,
//! IRQ 0 override), SRAT (each vCPU's and each RAM slice's proximity
//! domain) and SLIT (distances between them), built with the `acpi_tables`
//! crate and placed in the reserved BIOS area at [`ACPI_START`] (the RSDP
//! first, on a 16-byte boundary, where Linux also finds it by scanning).
//!
//! A FADT for a hardware-reduced ACPI platform (no PM timer, GPE or
//! power-management ports: the VM resets through the keyboard controller,
//! see `vcpu.rs`) points at a DSDT that announces each virtio-mmio device
//! as an `LNRO0005` device with its register window and interrupt, which
//! is how Linux's virtio_mmio driver finds devices when, as in Debian's
//! kernel, `virtio_mmio.device=` command-line devices are not built in.
//!
//! The guest's NUMA topology is what the monitor really did: each slice of
//! RAM is backed by its node's pool and each vCPU thread is pinned to its
//! node's CPUs.

use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::{rsdp::Rsdp, sdt::Sdt, slit::SLIT, srat::MemoryAffinity, xsdt::XSDT, Aml};

use super::layout::{
    NumaPlan, ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};

const OEM_ID: [u8; 6] = *b"DISCO ";
const OEM_TABLE: [u8; 8] = *b"DISCOVM ";

/// The tables laid out for guest-physical [`ACPI_START`]: `(address, bytes)`
/// pieces to copy into guest RAM, and the RSDP's address.
pub struct AcpiTables {
    pub pieces: Vec<(u64, Vec<u8>)>,
    pub rsdp_addr: u64,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// MADT: one enabled local APIC per vCPU (APIC ID = vCPU index), the
/// IOAPIC at GSI 0, ISA IRQ 0 (the PIT) routed to GSI 2 as KVM wires it,
/// and LINT1 of every CPU as NMI.
pub fn madt(vcpus: usize) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE, 1);
    t.write(36, LAPIC_ADDR);
    t.write(40, 1u32); // PCAT_COMPAT: the guest also has dual 8259s
    for i in 0..vcpus {
        let lapic = acpi_tables::madt::ProcessorLocalApic::new(
            i as u8,
            i as u8,
            acpi_tables::madt::EnabledStatus::Enabled,
        );
        t.append_slice(&bytes(&lapic));
    }
    t.append_slice(&bytes(&acpi_tables::madt::IoApic::new(0, IOAPIC_ADDR, 0)));
    // Interrupt source override (type 2): bus 0, IRQ 0 -> GSI 2, flags 0.
    let mut iso = vec![2u8, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    t.append_slice(&iso);
    // Local APIC NMI (type 4): all processors, flags 0, LINT1.
    t.append_slice(&[4u8, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

/// SRAT: a processor local APIC affinity per vCPU and a memory affinity
/// per guest node.
pub fn srat(plan: &NumaPlan) -> Vec<u8> {
    let mut t = Sdt::new(*b"SRAT", 36, 3, OEM_ID, OEM_TABLE, 1);
    // Reserved: a u32 that must be 1, then 8 bytes.
    let mut reserved = 1u32.to_le_bytes().to_vec();
    reserved.extend_from_slice(&[0; 8]);
    t.append_slice(&reserved);
    for (apic_id, &pxm) in plan.vcpu_domains.iter().enumerate() {
        // Processor local APIC affinity (type 0, 16 bytes).
        let mut s = vec![0u8, 16, (pxm & 0xff) as u8, apic_id as u8];
        s.extend_from_slice(&1u32.to_le_bytes()); // enabled
        s.push(0); // local SAPIC EID
        s.extend_from_slice(&pxm.to_le_bytes()[1..4]);
        s.extend_from_slice(&0u32.to_le_bytes()); // clock domain
        t.append_slice(&s);
    }
    for (pxm, node) in plan.nodes.iter().enumerate() {
        let m = MemoryAffinity::new(pxm as u32, node.mem_start, node.mem_len).enabled();
        t.append_slice(&bytes(&m));
    }
    t.as_slice().to_vec()
}

/// SLIT: the guest nodes' distances.
pub fn slit(plan: &NumaPlan) -> Vec<u8> {
    let n = plan.nodes.len();
    let mut t = SLIT::new(OEM_ID, OEM_TABLE, 1, n as u32);
    for a in 0..n {
        for b in 0..n {
            if a != b {
                t.set_distance(a, b, plan.distances[a][b]);
            }
        }
    }
    bytes(&t)
}

/// DSDT: virtio-mmio device `i` as `\_SB.VRxx` (HID LNRO0005) with its
/// 4 KiB register window and its edge-triggered, active-high interrupt.
pub fn dsdt(virtio_devices: usize) -> Vec<u8> {
    let hid: &'static str = "LNRO0005";
    let names: Vec<String> = (0..virtio_devices).map(|i| format!("VR{i:02X}")).collect();
    let uids: Vec<u32> = (0..virtio_devices as u32).collect();
    let mems: Vec<Memory32Fixed> = (0..virtio_devices)
        .map(|i| {
            Memory32Fixed::new(
                true,
                (VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE) as u32,
                VIRTIO_MMIO_SIZE as u32,
            )
        })
        .collect();
    let irqs: Vec<Interrupt> = (0..virtio_devices as u32)
        .map(|i| Interrupt::new(true, true, false, false, VIRTIO_IRQ_BASE + i))
        .collect();
    let crs: Vec<ResourceTemplate> = (0..virtio_devices)
        .map(|i| ResourceTemplate::new(vec![&mems[i], &irqs[i]]))
        .collect();
    let hid_names: Vec<Name> = (0..virtio_devices)
        .map(|_| Name::new(Path::new("_HID"), &hid))
        .collect();
    let uid_names: Vec<Name> = uids
        .iter()
        .map(|u| Name::new(Path::new("_UID"), u))
        .collect();
    let crs_names: Vec<Name> = crs
        .iter()
        .map(|c| Name::new(Path::new("_CRS"), c))
        .collect();
    let devices: Vec<Device> = (0..virtio_devices)
        .map(|i| {
            Device::new(
                Path::new(&names[i]),
                vec![&hid_names[i], &uid_names[i], &crs_names[i]],
            )
        })
        .collect();
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&bytes(&Scope::new(Path::new("\\_SB_"), children)));
    t.as_slice().to_vec()
}

/// Lays out RSDP, XSDT, FADT, DSDT, MADT, SRAT and SLIT from [`ACPI_START`].
pub fn build(vcpus: usize, plan: &NumaPlan, virtio_devices: usize) -> anyhow::Result<AcpiTables> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = ACPI_START + 0x40;
    let mut next = xsdt_addr + 0x100;
    let dsdt = dsdt(virtio_devices);
    let dsdt_addr = next;
    next = (next + dsdt.len() as u64).next_multiple_of(16);
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr)
        .finalize();
    let tables = [bytes(&fadt), madt(vcpus), srat(plan), slit(plan)];
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    let mut pieces = vec![(dsdt_addr, dsdt)];
    for t in tables {
        xsdt.add_entry(next);
        let len = t.len() as u64;
        pieces.push((next, t));
        next = (next + len).next_multiple_of(16);
    }
    anyhow::ensure!(
        next <= ACPI_END,
        "the ACPI tables ({} bytes) do not fit below 1 MiB",
        next - ACPI_START
    );
    let xsdt = bytes(&xsdt);
    anyhow::ensure!(xsdt.len() <= 0x100, "XSDT too large");
    pieces.push((xsdt_addr, xsdt));
    pieces.push((rsdp_addr, bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    Ok(AcpiTables { pieces, rsdp_addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_lengths_and_checksums() {
        let plan = NumaPlan::new(&[0, 1], 256 << 20, |_, _| 20);
        for (sig, t) in [
            ("APIC", madt(2)),
            ("SRAT", srat(&plan)),
            ("SLIT", slit(&plan)),
        ] {
            assert_eq!(&t[0..4], sig.as_bytes());
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert!(checksum_ok(&t), "{sig} checksum");
        }
        // SRAT: 48 header bytes, 2 processor entries of 16, 2 memory entries of 40.
        assert_eq!(srat(&plan).len(), 48 + 2 * 16 + 2 * 40);
        let slit = slit(&plan);
        assert_eq!(&slit[44..48], &[10, 20, 20, 10]);
        let built = build(2, &plan, 2).unwrap();
        for (_, t) in &built.pieces[..built.pieces.len() - 1] {
            assert!(checksum_ok(t), "{:?} checksum", &t[0..4]);
        }
        let dsdt = dsdt(2);
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        let rsdp = &built
            .pieces
            .iter()
            .find(|p| p.0 == built.rsdp_addr)
            .unwrap()
            .1;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]) && checksum_ok(rsdp));
    }
}
