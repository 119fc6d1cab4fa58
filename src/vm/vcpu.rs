//! A vCPU thread: pins itself to its host CPUs, runs `KVM_RUN` in a loop,
//! answers hypercalls and turns every other exit into a failure that stops
//! the whole VM (its sibling vCPUs are kicked; other VMs are unaffected).
//!
//! The thread never panics the process: the run loop reports errors as a
//! [`VcpuOutcome::Failed`], and a panic inside it is caught and reported the
//! same way.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;

use super::control::{KickTarget, Parked, VmControl};
use super::hypercall::{read_log_line, Hypercall};
use super::ram::GuestRam;
use super::state::{VcpuState, MICRO_MSRS};
use super::VcpuPlacement;

/// How one vCPU ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "one outcome per vCPU, made once: size is irrelevant, plain fields are easier to match"
)]
pub enum VcpuOutcome {
    /// The guest made the DONE hypercall. `expected` is the host model's
    /// result (`guest::model`), `None` when the model has none.
    Done { result: u64, expected: Option<u64> },
    /// The vCPU failed, or was stopped because the VM was (time limit,
    /// another vCPU's failure, `MicroVm::stop`); `regs` is its state then.
    Failed { reason: String, regs: RegisterDump },
    /// The vCPU never ran: its VM was not created or never started.
    NotRun,
}

impl VcpuOutcome {
    /// Done with the result the model expects (a result the model cannot
    /// check is not ok).
    pub fn checksum_ok(&self) -> bool {
        matches!(self, VcpuOutcome::Done { result, expected: Some(e) } if result == e)
    }
}

/// A vCPU's registers at the time it stopped, with the instruction at RIP.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegisterDump {
    pub rip: u64,
    pub rsp: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub ss: u16,
    /// Up to 16 bytes of guest memory at RIP (empty when unreadable).
    pub code: Vec<u8>,
    /// The instruction at RIP, Intel syntax, when it decodes.
    pub instruction: Option<String>,
    /// Why the registers could not be read, if they could not.
    pub error: Option<String>,
}

impl RegisterDump {
    /// Reads `vcpu`'s state. Never fails: what cannot be read is noted.
    pub fn capture(vcpu: &VcpuFd, ram: &GuestRam) -> RegisterDump {
        let (regs, sregs) = match (vcpu.get_regs(), vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                return RegisterDump {
                    error: Some(format!("cannot read vCPU registers: {e}")),
                    ..RegisterDump::default()
                }
            }
        };
        // Guest virtual == guest physical (identity map); ask KVM anyway,
        // the guest may have broken its page tables.
        let gpa = match vcpu.translate_gva(regs.rip) {
            Ok(t) if t.valid != 0 => t.physical_address,
            _ => regs.rip,
        };
        let code = (0..=16usize)
            .rev()
            .find_map(|len| ram.read(gpa, len))
            .unwrap_or_default();
        let mut decoder = Decoder::with_ip(64, &code, regs.rip, DecoderOptions::NONE);
        let instruction = (!code.is_empty()).then(|| decoder.decode()).and_then(|i| {
            (!i.is_invalid()).then(|| {
                let mut text = String::new();
                IntelFormatter::new().format(&i, &mut text);
                text
            })
        });
        RegisterDump {
            rip: regs.rip,
            rsp: regs.rsp,
            rax: regs.rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsi: regs.rsi,
            rdi: regs.rdi,
            rbp: regs.rbp,
            r8: regs.r8,
            r9: regs.r9,
            r10: regs.r10,
            r11: regs.r11,
            r12: regs.r12,
            r13: regs.r13,
            r14: regs.r14,
            r15: regs.r15,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs: sregs.cs.selector,
            ss: sregs.ss.selector,
            code,
            instruction,
            error: None,
        }
    }
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.error {
            return write!(f, "<{e}>");
        }
        write!(f, "rip={:#x} ", self.rip)?;
        match &self.instruction {
            Some(i) => write!(f, "[{i}]")?,
            None => write!(f, "[?]")?,
        }
        if !self.code.is_empty() {
            write!(f, " code=")?;
            for b in &self.code {
                write!(f, "{b:02x}")?;
            }
        }
        writeln!(
            f,
            "\n  rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rsp, self.rflags, self.cs, self.ss, self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )?;
        let gprs = [
            ("rax", self.rax),
            ("rbx", self.rbx),
            ("rcx", self.rcx),
            ("rdx", self.rdx),
            ("rsi", self.rsi),
            ("rdi", self.rdi),
            ("rbp", self.rbp),
            ("r8", self.r8),
            ("r9", self.r9),
            ("r10", self.r10),
            ("r11", self.r11),
            ("r12", self.r12),
            ("r13", self.r13),
            ("r14", self.r14),
            ("r15", self.r15),
        ];
        for (row, chunk) in gprs.chunks(5).enumerate() {
            if row > 0 {
                writeln!(f)?;
            }
            write!(f, " ")?;
            for (name, v) in chunk {
                write!(f, " {name}={v:#x}")?;
            }
        }
        Ok(())
    }
}

/// Pins thread `tid` (0: the calling thread) to `host_cpus`; an empty list
/// leaves it unpinned. Used by both VM kinds' vCPU threads at start and by
/// vCPU moves.
pub(crate) fn pin_thread(tid: i32, host_cpus: &[usize]) -> Result<(), String> {
    if host_cpus.is_empty() {
        return Ok(());
    }
    let mut set = nix::sched::CpuSet::new();
    for &cpu in host_cpus {
        set.set(cpu)
            .map_err(|e| format!("host CPU {cpu} cannot be pinned to: {e}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .map_err(|e| format!("cannot pin to host CPUs {host_cpus:?}: {e}"))
}

/// Joins vCPU threads (a thread that panicked outside its run loop counts
/// as failed) and then the watchdog.
pub(crate) fn join_vcpu_threads(
    threads: Vec<std::thread::JoinHandle<VcpuOutcome>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
) -> Vec<VcpuOutcome> {
    let outcomes = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| VcpuOutcome::Failed {
                reason: "vCPU thread panicked outside its run loop".into(),
                regs: RegisterDump::default(),
            })
        })
        .collect();
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    outcomes
}

/// What the two kinds of vCPU thread (micro-VM here, Linux in
/// `crate::linux::vcpu`) give the run loop they share. Each handles its
/// own exits in `step`; pinning, kicks, pausing, stopping, panics and the
/// outcome of a failure are handled alike by [`run_vcpu_loop`].
pub(crate) trait VcpuLoop {
    /// What the guest's own end of the run carries (the DONE hypercall's
    /// result, why a Linux guest stopped).
    type End;
    fn index(&self) -> usize;
    fn control(&self) -> &VmControl;
    fn placement(&self) -> &VcpuPlacement;
    fn vcpu(&self) -> &VcpuFd;
    fn vcpu_mut(&mut self) -> &mut VcpuFd;
    fn ram(&self) -> &GuestRam;
    /// One `KVM_RUN` and the handling of its exit: `None` to go on.
    fn step(&mut self) -> Result<Option<Self::End>, String>;
    /// The vCPU's state for a snapshot, read by its own parked thread (a
    /// micro-VM's: registers and [`MICRO_MSRS`]).
    fn capture_state(&mut self) -> Result<VcpuState, String> {
        VcpuState::capture(self.vcpu_mut(), &MICRO_MSRS, false)
    }
}

/// How a vCPU's run loop ended.
pub(crate) enum Ended<T> {
    /// The guest ended its run.
    Guest(T),
    Failed(String),
    /// The VM was stopped (time limit, a sibling's failure, a request).
    Stopped,
}

/// Runs a vCPU thread: pins it to its host CPUs, makes it kickable, then
/// steps `KVM_RUN` until the guest ends its run, the VM stops or a step
/// fails; parks while the VM is paused. A panic is caught and reported as
/// a failure, so the thread never takes the process down.
pub(crate) fn run_vcpu_loop<L: VcpuLoop>(thread: &mut L) -> Ended<L::End> {
    catch_unwind(AssertUnwindSafe(|| steps(thread))).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Ended::Failed(format!("vCPU thread panicked: {msg}"))
    })
}

fn steps<L: VcpuLoop>(thread: &mut L) -> Ended<L::End> {
    let placement = thread.placement();
    if let Err(e) = pin_thread(0, &placement.host_cpus) {
        return Ended::Failed(format!("{e} (node {})", placement.node));
    }
    let _kick = match KickTarget::install(thread.vcpu_mut().get_kvm_run()) {
        Ok(k) => k,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    loop {
        if thread.control().stopping() {
            return Ended::Stopped;
        }
        let index = thread.index();
        if let Parked::Capture(capture) = thread.control().park_if_paused(index) {
            let state = thread.capture_state();
            thread.control().answer_capture(index, capture, state);
            continue;
        }
        if thread.control().stopping() {
            return Ended::Stopped;
        }
        match thread.step() {
            Ok(None) => {}
            Ok(Some(end)) => return Ended::Guest(end),
            Err(e) => return Ended::Failed(e),
        }
    }
}

/// The outcome of a vCPU that failed: its VM is stopped, its registers
/// kept for the report.
pub(crate) fn failed_outcome<L: VcpuLoop>(thread: &L, reason: String) -> VcpuOutcome {
    thread
        .control()
        .request_stop(format!("vCPU {} failed: {reason}", thread.index()));
    VcpuOutcome::Failed {
        reason,
        regs: RegisterDump::capture(thread.vcpu(), thread.ram()),
    }
}

/// The outcome of a vCPU its VM stopped, with the VM's stop reason.
pub(crate) fn stopped_outcome<L: VcpuLoop>(thread: &L) -> VcpuOutcome {
    let why = thread.control().reason();
    VcpuOutcome::Failed {
        reason: format!(
            "stopped: {}",
            why.unwrap_or_else(|| "stop requested".into())
        ),
        regs: RegisterDump::capture(thread.vcpu(), thread.ram()),
    }
}

/// A failed `KVM_RUN`: `None` when it was only interrupted (a kick or
/// another signal; the caller clears `immediate_exit` and goes on).
pub(crate) fn run_failure(e: &kvm_ioctls::Error) -> Option<String> {
    match e.errno() {
        libc::EINTR | libc::EAGAIN => None,
        libc::EFAULT => Some(format!(
            "KVM_RUN failed with EFAULT: guest access to host memory that is not \
             mapped or not writable ({e})"
        )),
        _ => Some(format!("KVM_RUN failed: {e}")),
    }
}

/// Describes an exit neither kind of guest should cause: a failed VM
/// entry, a memory fault KVM hands to user space, anything unknown.
pub(crate) fn unexpected_exit(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::FailEntry(reason, cpu) => format!(
            "VM entry failed (KVM_EXIT_FAIL_ENTRY): hardware reason {reason:#x} on host CPU {cpu}"
        ),
        VcpuExit::MemoryFault { flags, gpa, size } => {
            format!("memory fault at guest-physical {gpa:#x}+{size:#x} (flags {flags:#x})")
        }
        other => format!("unexpected exit: {other:?}"),
    }
}

/// Describes a `KVM_EXIT_INTERNAL_ERROR` from the `kvm_run` data.
pub(crate) fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
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

/// Everything a micro-VM's vCPU thread owns.
pub(crate) struct VcpuThread {
    pub index: usize,
    pub vcpu: VcpuFd,
    pub placement: VcpuPlacement,
    pub ram: GuestRam,
    pub control: Arc<VmControl>,
    /// The VM's log, shared by its vCPUs.
    pub log: Arc<parking_lot::Mutex<Vec<String>>>,
    pub vm_name: String,
}

impl VcpuThread {
    /// The thread body: registers for kicks, runs, reports. A failure stops
    /// the VM.
    pub fn run(mut self) -> VcpuOutcome {
        self.control.register(self.index);
        let outcome = match run_vcpu_loop(&mut self) {
            Ended::Guest(result) => {
                self.control.set_done(self.index, result);
                VcpuOutcome::Done {
                    result,
                    expected: None,
                }
            }
            Ended::Failed(reason) => failed_outcome(&self, reason),
            Ended::Stopped => stopped_outcome(&self),
        };
        self.control.thread_exits(self.index);
        outcome
    }

    fn regs(&self) -> Result<kvm_bindings::kvm_regs, String> {
        self.vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS failed: {e}"))
    }
}

impl VcpuLoop for VcpuThread {
    /// The DONE hypercall's result.
    type End = u64;

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

    fn step(&mut self) -> Result<Option<u64>, String> {
        let index = self.index;
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
            VcpuExit::IoIn(port, data) => match Hypercall::decode(port, true) {
                Some(Hypercall::WhoAmI) => {
                    let bytes = (index as u32).to_le_bytes();
                    let n = data.len().min(bytes.len());
                    data[..n].copy_from_slice(&bytes[..n]);
                    Ok(None)
                }
                _ => Err(format!("read from unknown I/O port {port:#x}")),
            },
            VcpuExit::IoOut(port, data) => match Hypercall::decode(port, false) {
                Some(Hypercall::Done) => Ok(Some(self.regs()?.rdi)),
                Some(Hypercall::Log) => {
                    let regs = self.regs()?;
                    let text = read_log_line(&self.ram, regs.rdi, regs.rsi)?;
                    let line = format!("vcpu{index}: {text}");
                    tracing::debug!(vm = %self.vm_name, "{line}");
                    self.log.lock().push(line);
                    Ok(None)
                }
                _ => Err(format!(
                    "write of {data:02x?} to unknown I/O port {port:#x}"
                )),
            },
            VcpuExit::MmioRead(addr, data) => Err(format!(
                "{}-byte MMIO read at guest-physical {addr:#x} (outside RAM)",
                data.len()
            )),
            VcpuExit::MmioWrite(addr, data) => Err(format!(
                "MMIO write of {data:02x?} at guest-physical {addr:#x} (outside RAM)"
            )),
            VcpuExit::Shutdown => {
                Err("triple fault (KVM_EXIT_SHUTDOWN): an exception with no IDT".into())
            }
            VcpuExit::InternalError => Err(internal_error(&mut self.vcpu)),
            VcpuExit::Hlt => Err("guest halted".into()),
            VcpuExit::Intr => {
                self.vcpu.set_kvm_immediate_exit(0);
                Ok(None)
            }
            other => Err(unexpected_exit(&other)),
        }
    }
}
