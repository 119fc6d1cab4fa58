//! The vCPU thread of a Linux VM: pins itself to its node's CPUs, runs
//! `KVM_RUN`, dispatches port I/O (COM1, the keyboard controller's reset
//! line, everything else reads as all-ones and ignores writes, as on a PC
//! with nothing there) and MMIO (virtio-mmio devices).
//!
//! A guest-requested reset or power-off (keyboard controller reset, a KVM
//! system event) ends the VM cleanly: every vCPU reports `Done`. A triple
//! fault (`KVM_EXIT_SHUTDOWN`), an emulation failure
//! (`KVM_EXIT_INTERNAL_ERROR`), a failed entry, a `KVM_RUN` error or an
//! unexpected exit stops the VM with each vCPU's registers; the time limit
//! and `LinuxVm::stop` stop it too. Other VMs are not affected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::Devices;
use crate::vm::control::VmControl;
use crate::vm::vcpu::{
    failed_outcome, internal_error, run_failure, run_vcpu_loop, stopped_outcome, unexpected_exit,
    Ended, VcpuLoop,
};
use crate::vm::{GuestRam, VcpuOutcome, VcpuPlacement, VcpuState};

/// The keyboard controller's command port; writing 0xfe pulses reset.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

pub(crate) struct LinuxVcpu {
    pub index: usize,
    pub vcpu: VcpuFd,
    pub placement: VcpuPlacement,
    pub ram: GuestRam,
    pub control: Arc<VmControl>,
    pub devices: Arc<Devices>,
    /// Set when the guest asked for reset/power-off: the stop is a clean end.
    pub guest_ended: Arc<AtomicBool>,
    /// The MSRs a snapshot reads (KVM's list of MSRs to save).
    pub msrs: Arc<[u32]>,
}

impl LinuxVcpu {
    pub fn run(mut self) -> VcpuOutcome {
        self.control.register(self.index);
        let done = VcpuOutcome::Done {
            result: 0,
            expected: Some(0),
        };
        let outcome = match run_vcpu_loop(&mut self) {
            Ended::Guest(why) => {
                self.guest_ended.store(true, Ordering::SeqCst);
                self.control
                    .request_stop(format!("guest {why} (vCPU {})", self.index));
                done
            }
            // A sibling's reset or power-off stopped this vCPU: a clean end.
            Ended::Stopped if self.guest_ended.load(Ordering::SeqCst) => done,
            Ended::Failed(reason) => failed_outcome(&self, reason),
            Ended::Stopped => stopped_outcome(&self),
        };
        self.control.thread_exits(self.index);
        outcome
    }
}

impl VcpuLoop for LinuxVcpu {
    /// Why the guest stopped itself (reset, power-off).
    type End = String;

    fn index(&self) -> usize {
        self.index
    }
    fn control(&self) -> &VmControl {
        &self.control
    }
    fn placement(&self) -> &VcpuPlacement {
        &self.placement
    }
    fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }
    fn vcpu_mut(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }
    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Registers, LAPIC and every MSR KVM saves.
    fn capture_state(&mut self) -> Result<VcpuState, String> {
        VcpuState::capture(&mut self.vcpu, &self.msrs, true)
    }

    fn step(&mut self) -> Result<Option<String>, String> {
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                if let Some(why) = run_failure(&e) {
                    return Err(why);
                }
                // A kick (or another signal); the loop checks the flags.
                self.vcpu.set_kvm_immediate_exit(0);
                return Ok(None);
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.devices.pio_read(port, data);
                Ok(None)
            }
            VcpuExit::IoOut(port, data) => {
                if port == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
                    return Ok(Some("requested a reset (keyboard controller)".into()));
                }
                self.devices.pio_write(port, data);
                Ok(None)
            }
            VcpuExit::MmioRead(addr, data) => {
                self.devices.mmio_read(addr, data);
                Ok(None)
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.devices.mmio_write(addr, data);
                Ok(None)
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some("powered off".into())),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(Some("requested a reset".into())),
                other => Err(format!("KVM system event {other}")),
            },
            VcpuExit::Hlt => Ok(None),
            VcpuExit::Intr => {
                self.vcpu.set_kvm_immediate_exit(0);
                Ok(None)
            }
            VcpuExit::Shutdown => {
                Err("triple fault (KVM_EXIT_SHUTDOWN): the guest reset the CPU by faulting".into())
            }
            VcpuExit::InternalError => Err(internal_error(&mut self.vcpu)),
            other => Err(unexpected_exit(&other)),
        }
    }
}
