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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::Devices;
use crate::vm::control::{KickTarget, VmControl};
use crate::vm::{GuestRam, RegisterDump, VcpuOutcome, VcpuPlacement};

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
}

enum Ended {
    GuestStopped(String),
    Failed(String),
    Stopped,
}

impl LinuxVcpu {
    pub fn run(mut self) -> VcpuOutcome {
        self.control.register(self.index);
        let ended = catch_unwind(AssertUnwindSafe(|| self.run_loop())).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Ended::Failed(format!("vCPU thread panicked: {msg}"))
        });
        let done = VcpuOutcome::Done {
            result: 0,
            expected: Some(0),
        };
        let outcome = match ended {
            Ended::GuestStopped(why) => {
                self.guest_ended.store(true, Ordering::SeqCst);
                self.control
                    .request_stop(format!("guest {why} (vCPU {})", self.index));
                done
            }
            Ended::Stopped if self.guest_ended.load(Ordering::SeqCst) => done,
            Ended::Failed(reason) => {
                self.control
                    .request_stop(format!("vCPU {} failed: {reason}", self.index));
                VcpuOutcome::Failed {
                    reason,
                    regs: RegisterDump::capture(&self.vcpu, &self.ram),
                }
            }
            Ended::Stopped => VcpuOutcome::Failed {
                reason: format!(
                    "stopped: {}",
                    self.control
                        .reason()
                        .unwrap_or_else(|| "stop requested".into())
                ),
                regs: RegisterDump::capture(&self.vcpu, &self.ram),
            },
        };
        self.control.unregister(self.index);
        outcome
    }

    fn pin(&self) -> Result<(), String> {
        crate::vm::vcpu::pin_thread(0, &self.placement.host_cpus)
    }

    fn run_loop(&mut self) -> Ended {
        if let Err(e) = self.pin() {
            return Ended::Failed(e);
        }
        let _kick = match KickTarget::install(self.vcpu.get_kvm_run()) {
            Ok(k) => k,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        loop {
            if self.control.stopping() {
                return Ended::Stopped;
            }
            self.control.park_if_paused();
            if self.control.stopping() {
                return Ended::Stopped;
            }
            match self.step() {
                Ok(None) => {}
                Ok(Some(e)) => return e,
                Err(e) => return Ended::Failed(e),
            }
        }
    }

    fn step(&mut self) -> Result<Option<Ended>, String> {
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
                return Ok(None);
            }
            Err(e) if e.errno() == libc::EFAULT => {
                return Err(format!(
                    "KVM_RUN failed with EFAULT: guest access to host memory that is not \
                     mapped or not writable ({e})"
                ))
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.devices.pio_read(port, data);
                Ok(None)
            }
            VcpuExit::IoOut(port, data) => {
                if port == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
                    return Ok(Some(Ended::GuestStopped(
                        "requested a reset (keyboard controller)".into(),
                    )));
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
            VcpuExit::SystemEvent(kind, _) => Ok(Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Ended::GuestStopped("powered off".into())
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Ended::GuestStopped("requested a reset".into())
                }
                other => Ended::Failed(format!("KVM system event {other}")),
            })),
            VcpuExit::Hlt => Ok(None),
            VcpuExit::Intr => {
                self.vcpu.set_kvm_immediate_exit(0);
                Ok(None)
            }
            VcpuExit::Shutdown => {
                Err("triple fault (KVM_EXIT_SHUTDOWN): the guest reset the CPU by faulting".into())
            }
            VcpuExit::FailEntry(reason, cpu) => Err(format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY): hardware reason {reason:#x} on host CPU {cpu}"
            )),
            VcpuExit::InternalError => Err(self.internal_error()),
            VcpuExit::MemoryFault { flags, gpa, size } => Err(format!(
                "memory fault at guest-physical {gpa:#x}+{size:#x} (flags {flags:#x})"
            )),
            other => Err(format!("unexpected exit: {other:?}")),
        }
    }

    fn internal_error(&mut self) -> String {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the active member of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                "emulation failure (KVM could not emulate the instruction at RIP)"
            }
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "internal error",
        };
        format!(
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR): {what}, suberror {}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }
}
