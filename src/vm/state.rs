//! A micro-VM's state outside its memory: each vCPU's KVM state and the
//! micro-VM's own book-keeping, captured with the VM paused and applied to
//! the fresh vCPUs of a fresh VM (snapshots, clones; later migration).
//!
//! What a micro-VM's vCPU holds (see `cpu_setup`): general registers,
//! segment and control registers (long mode, CPL 3, no IDT), the FPU/SSE
//! state (XSAVE area), XCR0, the debug registers, a few MSRs and the
//! pending-event state. A micro-VM has no in-kernel irqchip (no LAPIC,
//! IOAPIC or PIT: `MicroVm::create` makes none) and no devices, so there is
//! nothing else to carry. A Linux guest's vCPUs add their LAPIC and every
//! MSR KVM saves (`crate::linux::state` adds the VM-wide state: irqchip,
//! PIT, clock, devices).
//!
//! A vCPU is captured by its own thread while it is parked (see
//! `VmControl::capture_parked`): the thread first completes an exit left
//! half-done (a port I/O read whose data KVM copies into RAX on the next
//! `KVM_RUN`) by entering `KVM_RUN` with `immediate_exit` set, as the KVM
//! API asks before state is saved; then it reads the registers.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// MSRs a micro-guest's vCPU state depends on (the rest are either in the
/// segment registers, like EFER and the FS/GS bases, or unused at CPL 3
/// without interrupts). The time stamp counter is among them so `rdtsc`
/// goes on from where it was.
pub const MICRO_MSRS: [u32; 9] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// One vCPU's KVM state (the kvm-bindings structures, serialised as their
/// raw bytes by kvm-bindings' serde support).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// `(index, value)` of the MSRs asked for that KVM could read.
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers (a Linux guest's vCPU; a micro-VM has
    /// no in-kernel irqchip).
    #[serde(default)]
    pub lapic: Option<kvm_lapic_state>,
}

/// Reads the MSRs `indices` of `vcpu`: `(index, value)` of each KVM could
/// read. KVM_GET_MSRS stops at the first MSR it cannot read (one the
/// guest's CPUID does not offer); that one is skipped and the rest read on.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let mut msrs = Msrs::from_entries(
            &rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| format!("MSR list: {e:?}"))?;
        let read = ioctl("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

fn ioctl<T>(what: &str, r: Result<T, kvm_ioctls::Error>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

impl VcpuState {
    /// Reads `vcpu`'s state: its registers, the MSRs `msrs` (those KVM can
    /// read) and, with `lapic`, its local APIC. The caller is the vCPU's
    /// own thread, outside `KVM_RUN`; a pending port I/O completion is
    /// carried out first.
    pub fn capture(vcpu: &mut VcpuFd, msrs: &[u32], lapic: bool) -> Result<VcpuState, String> {
        vcpu.set_kvm_immediate_exit(1);
        let completed = vcpu.run().map(|_| ());
        vcpu.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(format!("completing the last exit (KVM_RUN): {e}")),
            Ok(()) => return Err("KVM_RUN with immediate_exit ran the guest".into()),
        }
        Ok(VcpuState {
            regs: ioctl("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", vcpu.get_sregs())?,
            xsave: ioctl("KVM_GET_XSAVE", vcpu.get_xsave())?,
            xcrs: ioctl("KVM_GET_XCRS", vcpu.get_xcrs())?,
            debugregs: ioctl("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
            mp_state: ioctl("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
            events: ioctl("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
            msrs: read_msrs(vcpu, msrs)?,
            lapic: match lapic {
                true => Some(ioctl("KVM_GET_LAPIC", vcpu.get_lapic())?),
                false => None,
            },
        })
    }

    /// Puts the state into a fresh vCPU (never run), after `cpuid`. Every
    /// saved MSR must take.
    pub fn apply(&self, vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), String> {
        ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(cpuid))?;
        ioctl("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        ioctl("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        // SAFETY: the area was read by KVM_GET_XSAVE (4 KiB). Only
        // dynamically enabled features (AMX) need more, and no guest gets
        // them: disco never asks for their permission
        // (ARCH_REQ_XCOMP_GUEST_PERM), so a micro-guest's and a Linux
        // guest's state both fit.
        ioctl("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })?;
        ioctl("KVM_SET_XCRS", vcpu.set_xcrs(&self.xcrs))?;
        ioctl("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debugregs))?;
        // The LAPIC before the MSRs: its TSC deadline is an MSR that only
        // takes with the timer in that mode.
        if let Some(lapic) = &self.lapic {
            ioctl("KVM_SET_LAPIC", vcpu.set_lapic(lapic))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let set = ioctl("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
        if set != entries.len() {
            return Err(format!(
                "KVM_SET_MSRS set {set} of {} MSRs (refused: {:#x})",
                entries.len(),
                entries[set].index
            ));
        }
        ioctl("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }
}

/// Where one vCPU of a captured micro-VM was.
#[derive(Debug, Serialize, Deserialize)]
pub enum VcpuSnapshot {
    /// Running (parked): its state.
    Running(Box<VcpuState>),
    /// It had made the DONE hypercall with this result; it does not run
    /// again after a restore.
    Done { result: u64 },
}

/// A micro-VM's state apart from its memory: what a restore needs to go
/// on where the VM stopped. The workload, vCPU placement and time limit
/// are the VM's spec, which the monitor keeps with it (see
/// `crate::snapshot::VmMeta`).
#[derive(Debug, Serialize, Deserialize)]
pub struct MicroVmState {
    pub vcpus: Vec<VcpuSnapshot>,
    /// The lines the guest had logged.
    pub log: Vec<String>,
    /// How long it had run (counts against its time limit and in its run
    /// time after a restore).
    pub run_time_ns: u64,
    /// (done, total) progress when captured, for reports.
    pub progress: (u64, u64),
}
