//! Puts a vCPU directly into 64-bit long mode at CPL 3, with identity-mapped
//! page tables, a GDT and no IDT.
//!
//! Why CPL 3: on the build hosts KVM is the nested `kvm_pvm` kind, which runs
//! guest user mode natively but emulates every guest kernel-mode instruction
//! (~1.5 M instructions/s). A micro-guest therefore never runs at CPL 0: the
//! monitor sets up what a kernel would (paging, segments) and starts the
//! vCPU in user mode. The consequences:
//! * every page-table entry has the U/S bit (the guest accesses all of RAM);
//! * RFLAGS.IOPL = 3, so `in`/`out` (the hypercalls) are allowed at CPL 3;
//! * there is no IDT: any exception becomes a triple fault, which KVM reports
//!   as a shutdown exit; that is how a crashing micro-guest ends.
//!
//! Seen on the build hosts (`kvm_pvm`): a page fault at CPL 3 ends in
//! `KVM_EXIT_SHUTDOWN` with RIP at the faulting instruction and CR2 holding
//! the address; port I/O exits even with IOPL 0, and RFLAGS reads back with
//! IOPL 0 once the guest ran. IOPL 3 is still set: hardware KVM needs it.

use kvm_bindings::{kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;

use super::ram::GuestRam;
use crate::guest::layout::{
    stack_top, CODE_ADDR, GDT_ADDR, LARGE_PAGE, PAGE, PDPT_ADDR, PD_ADDR, PML4_ADDR,
};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set; IOPL 3 allows port I/O at CPL 3.
const RFLAGS_INITIAL: u64 = (1 << 1) | (3 << 12);

/// GDT: null, kernel code, kernel data, user code (64-bit), user data. The
/// kernel entries are never loaded; they keep the usual layout.
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: code, DPL 0, L
    0x00cf_9300_0000_ffff, // 0x10: data, DPL 0
    0x00af_fb00_0000_ffff, // 0x18: code, DPL 3, L
    0x00cf_f300_0000_ffff, // 0x20: data, DPL 3
];
/// User code selector (GDT index 3, RPL 3).
pub const USER_CS: u16 = 0x18 | 3;
/// User data selector (GDT index 4, RPL 3).
pub const USER_DS: u16 = 0x20 | 3;

/// Writes the identity map of `0..ram_bytes` with 2 MiB pages (user,
/// writable) and the GDT. `ram_bytes` is at most `layout::MAX_RAM`.
///
/// Every entry is written with its accessed (and, for the 2 MiB leaves,
/// dirty) bit already set, so the CPU never writes to the page tables. That
/// matters because identical page tables are shared copy-on-write across
/// VMs: an A/D-bit update by KVM's page walker is a kernel-mode write to a
/// write-protected page, which fails instead of taking the copy-on-write
/// fault path, and the guest would see a page fault (a triple fault here).
pub fn write_tables(ram: &GuestRam, ram_bytes: u64) {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
    let large_pages = ram_bytes.div_ceil(LARGE_PAGE);
    let gibs = large_pages.div_ceil(512);
    ram.zero(PML4_ADDR, PAGE);
    ram.write_words(PML4_ADDR, &[PDPT_ADDR | flags]);
    ram.zero(PDPT_ADDR, PAGE);
    let pdpt: Vec<u64> = (0..gibs).map(|i| (PD_ADDR + i * PAGE) | flags).collect();
    ram.write_words(PDPT_ADDR, &pdpt);
    ram.zero(PD_ADDR, gibs * PAGE);
    let pds: Vec<u64> = (0..large_pages)
        .map(|i| (i * LARGE_PAGE) | flags | PTE_DIRTY | PTE_LARGE)
        .collect();
    ram.write_words(PD_ADDR, &pds);
    ram.write_words(GDT_ADDR, &GDT);
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // execute/read or read/write, accessed
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID, the long-mode CPL 3 segment and control registers, and the
/// registers to enter the program at `CODE_ADDR` on vCPU `index`'s stack.
pub fn setup_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, index: usize) -> anyhow::Result<()> {
    vcpu.set_cpuid2(cpuid)?;

    let mut sregs = vcpu.get_sregs()?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cs = user_segment(USER_CS, true);
    let data = user_segment(USER_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    // No IDT: every exception escalates to a triple fault.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    vcpu.set_sregs(&sregs)?;

    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE_ADDR;
    regs.rsp = stack_top(index);
    regs.rflags = RFLAGS_INITIAL;
    vcpu.set_regs(&regs)?;
    Ok(())
}
