//! vCPU state for a Linux guest: CPUID from KVM's supported set (with each
//! vCPU's APIC ID and the hypervisor bit), a few MSRs, LAPIC LINT0/LINT1
//! wiring, and, for the boot vCPU, 64-bit mode at the kernel's entry with
//! `rsi` pointing at the zero page (the 64-bit boot protocol). The other
//! vCPUs stay in KVM's wait-for-SIPI state until the guest starts them.

use anyhow::{Context, Result};
use kvm_bindings::{kvm_msr_entry, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::layout::{BOOT_GDT, PML4, ZERO_PAGE};
use super::loader::BOOT_GDT_ENTRIES;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// CPUID for vCPU `index` of `count`.
pub fn cpuid_for(supported: &CpuId, index: usize, count: usize) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count; hypervisor bit.
                e.ebx = (e.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = index as u32,
            _ => {}
        }
    }
    cpuid
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID, MSRs and the LAPIC's LINT pins of any vCPU.
pub fn setup_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<()> {
    vcpu.set_cpuid2(cpuid).context("KVM_SET_CPUID2")?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    Ok(())
}

/// Puts the boot vCPU in 64-bit mode at `entry` (boot protocol: paging
/// identity-maps the loaded kernel, `__BOOT_CS` 0x10, `__BOOT_DS` 0x18,
/// `rsi` = zero page, interrupts off).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = segment(0x10, BOOT_GDT_ENTRIES[2]);
    let data = segment(0x18, BOOT_GDT_ENTRIES[3]);
    let mut tss = segment(0x20, BOOT_GDT_ENTRIES[4]);
    tss.limit = 0xffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x1 | 0x10 | 0x8000_0000; // PE, ET, PG
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x100 | 0x400; // LME, LMA
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rsp: ZERO_PAGE,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;
    Ok(())
}
