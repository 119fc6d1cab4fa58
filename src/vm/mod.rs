//! KVM micro-VMs: one KVM VM running a micro-guest (`crate::guest`) on
//! caller-owned RAM, one pinned host thread per vCPU, Firecracker-style.
//!
//! * [`ram`]: access to guest RAM through the caller's mapping;
//! * [`cpu_setup`]: page tables, GDT and vCPU registers for long mode at CPL 3;
//! * [`hypercall`]: the port-I/O hypercalls (WHOAMI, DONE, LOG);
//! * [`control`]: stop flag and the signal that kicks vCPUs out of `KVM_RUN`;
//! * [`vcpu`]: the vCPU thread and its exit handling.
//!
//! Life cycle: [`MicroVm::create`] makes the VM, registers the RAM as memory
//! slot 0 at guest-physical 0, writes page tables, parameters and code, and
//! creates the vCPUs; [`MicroVm::start`] spawns the vCPU threads and a
//! watchdog that enforces the time limit; [`MicroVm::progress`] reads the
//! guests' progress counters from RAM (no exits); [`MicroVm::wait`] joins and
//! reports. A failing vCPU stops its own VM only.

pub mod control;
pub mod cpu_setup;
pub mod hypercall;
pub mod ram;
pub mod state;
pub mod vcpu;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use crate::guest::layout::{self, VcpuParams, CODE_ADDR, CODE_MAX, PAGE, PARAMS_ADDR, SYNC_ADDR};
use crate::guest::{model, programs, Workload};
use control::VmControl;
pub use control::{thread_on_cpu, ThreadCpu};
pub use ram::GuestRam;
pub use state::{MicroVmState, VcpuSnapshot, VcpuState};
use vcpu::VcpuThread;
pub use vcpu::{RegisterDump, VcpuOutcome};

/// Where a vCPU runs: its thread is pinned to `host_cpus` (no pinning when
/// empty); `node` is the NUMA node they belong to, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuPlacement {
    pub node: usize,
    pub host_cpus: Vec<usize>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct MicroVmSpec {
    pub name: String,
    pub vcpus: Vec<VcpuPlacement>,
    pub workload: Workload,
    /// The VM is stopped (and its running vCPUs reported as failed) when it
    /// runs longer than this after `start`.
    pub time_limit: Duration,
}

/// How a VM ended.
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    pub name: String,
    pub vcpus: Vec<VcpuOutcome>,
    /// From `start` until the last vCPU thread exited.
    pub run_time: Duration,
    /// CPU time of the vCPU threads (of this run; a restored VM's earlier
    /// runs are not included).
    pub vcpu_cpu: ThreadCpu,
    /// The lines the guest logged, `vcpu<i>: <text>`.
    pub log: Vec<String>,
}

impl VmOutcome {
    /// Every vCPU is done with the model's result.
    pub fn checksum_ok(&self) -> bool {
        !self.vcpus.is_empty() && self.vcpus.iter().all(VcpuOutcome::checksum_ok)
    }

    /// The failed vCPUs: (index, reason, registers).
    pub fn failures(&self) -> impl Iterator<Item = (usize, &str, &RegisterDump)> {
        self.vcpus.iter().enumerate().filter_map(|(i, v)| match v {
            VcpuOutcome::Failed { reason, regs } => Some((i, reason.as_str(), regs)),
            VcpuOutcome::Done { .. } | VcpuOutcome::NotRun => None,
        })
    }
}

/// A running (or ready) micro-VM.
pub struct MicroVm {
    spec: MicroVmSpec,
    ram: GuestRam,
    vm: VmFd,
    params: Vec<VcpuParams>,
    /// Per vCPU, the progress value it reaches when done.
    totals: Vec<u64>,
    control: Arc<VmControl>,
    log: Arc<parking_lot::Mutex<Vec<String>>>,
    /// The vCPUs until `start` moves them into their threads.
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<VcpuOutcome>>,
    watchdog: Option<JoinHandle<()>>,
    started_at: Option<Instant>,
    /// Time run before this VM was restored from a snapshot (zero for a
    /// VM created fresh): counted in its time limit and run time.
    ran_before: Duration,
    /// Per vCPU, the DONE result it had made before a snapshot (it does
    /// not run again).
    done_before: Vec<Option<u64>>,
}

impl MicroVm {
    /// Creates the VM: plans the layout, registers `ram` (which the caller
    /// keeps mapped until this VM is dropped or waited for) as slot 0, writes
    /// page tables, GDT, parameter blocks and code, and creates the vCPUs.
    pub fn create(kvm: &Kvm, spec: MicroVmSpec, ram: GuestRam) -> anyhow::Result<MicroVm> {
        MicroVm::build(kvm, spec, ram, None)
    }

    /// A VM that goes on from `state` on `ram`, which already holds the
    /// snapshot's memory (page tables, parameters, code and data as the
    /// captured VM left them): nothing is written to RAM; the fresh vCPUs
    /// get the saved states. vCPUs that were done stay done.
    pub fn restore(
        kvm: &Kvm,
        spec: MicroVmSpec,
        ram: GuestRam,
        state: &MicroVmState,
    ) -> anyhow::Result<MicroVm> {
        let mut vm = MicroVm::build(kvm, spec, ram, Some(state))?;
        vm.ran_before = Duration::from_nanos(state.run_time_ns);
        *vm.log.lock() = state.log.clone();
        Ok(vm)
    }

    fn build(
        kvm: &Kvm,
        spec: MicroVmSpec,
        ram: GuestRam,
        restored: Option<&MicroVmState>,
    ) -> anyhow::Result<MicroVm> {
        let name = spec.name.clone();
        let ctx = || format!("creating micro-VM {name}");
        if !ram.host_addr.is_multiple_of(PAGE as usize) {
            bail!(
                "{}: guest RAM at {:#x} is not page-aligned",
                ctx(),
                ram.host_addr
            );
        }
        let params = layout::plan(&spec.workload, ram.size as u64, spec.vcpus.len())
            .map_err(anyhow::Error::msg)
            .with_context(ctx)?;
        let code = programs::assemble(&spec.workload)
            .map_err(|e| anyhow::anyhow!("assembling the {} program: {e}", spec.workload.name()))
            .with_context(ctx)?;
        if code.len() as u64 > CODE_MAX {
            bail!(
                "{}: program of {} bytes exceeds {CODE_MAX}",
                ctx(),
                code.len()
            );
        }
        control::install_kick_handler()?;
        if let Some(state) = restored {
            if state.vcpus.len() != params.len() {
                bail!(
                    "{}: the saved state has {} vCPUs, the spec {}",
                    ctx(),
                    state.vcpus.len(),
                    params.len()
                );
            }
        } else {
            cpu_setup::write_tables(&ram, ram.size as u64);
            ram.zero(PARAMS_ADDR, PAGE);
            for p in &params {
                ram.write_words(p.block_addr(), &p.block());
            }
            ram.zero(SYNC_ADDR, PAGE);
            ram.write(CODE_ADDR, &code);
            if let Some(p) = params.first() {
                ram.zero(p.shared_base, p.base - p.shared_base);
            }
        }

        let vm = kvm.create_vm().context("KVM_CREATE_VM").with_context(ctx)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size as u64,
            userspace_addr: ram.host_addr as u64,
        };
        // SAFETY: the region is the caller's mapping, which it keeps valid
        // for the VM's life (documented on `GuestRam`).
        unsafe { vm.set_user_memory_region(region) }
            .context("registering guest RAM as memory slot 0")
            .with_context(ctx)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")
            .with_context(ctx)?;
        let vcpus = (0..params.len())
            .map(|i| {
                let vcpu = vm
                    .create_vcpu(i as u64)
                    .with_context(|| format!("creating vCPU {i}"))?;
                match restored.map(|s| &s.vcpus[i]) {
                    None => cpu_setup::setup_vcpu(&vcpu, &cpuid, i)
                        .with_context(|| format!("setting up vCPU {i}"))?,
                    Some(VcpuSnapshot::Running(state)) => state
                        .apply(&vcpu, &cpuid)
                        .map_err(|e| anyhow::anyhow!("restoring vCPU {i}: {e}"))?,
                    Some(VcpuSnapshot::Done { .. }) => {}
                }
                Ok(vcpu)
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(ctx)?;

        let totals = params
            .iter()
            .map(|p| model::progress_total(&spec.workload, p))
            .collect();
        Ok(MicroVm {
            control: Arc::new(VmControl::new(params.len())),
            log: Arc::default(),
            spec,
            ram,
            vm,
            params,
            totals,
            vcpus,
            threads: Vec::new(),
            watchdog: None,
            started_at: None,
            ran_before: Duration::ZERO,
            done_before: match restored {
                Some(state) => state
                    .vcpus
                    .iter()
                    .map(|v| match v {
                        VcpuSnapshot::Done { result } => Some(*result),
                        VcpuSnapshot::Running(_) => None,
                    })
                    .collect(),
                None => Vec::new(),
            },
        })
    }

    /// Spawns one thread per vCPU (`disco-<vm>-vcpu<i>`, pinned to its
    /// placement's CPUs) and the time-limit watchdog.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.started_at.is_some() {
            bail!("micro-VM {} is already started", self.spec.name);
        }
        self.started_at = Some(Instant::now());
        let vcpus = std::mem::take(&mut self.vcpus);
        // vCPUs done before a snapshot have no thread.
        for (index, done) in self.done_before.iter().enumerate() {
            if let Some(result) = done {
                self.control.set_done(index, *result);
                self.control.unregister(index);
            }
        }
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            if self.done_before.get(index).is_some_and(Option::is_some) {
                continue;
            }
            let thread = VcpuThread {
                index,
                vcpu,
                placement: self.spec.vcpus[index].clone(),
                ram: self.ram,
                control: self.control.clone(),
                log: self.log.clone(),
                vm_name: self.spec.name.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("disco-{}-vcpu{index}", self.spec.name))
                .spawn(move || thread.run());
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    // The threads already started must not run unsupervised.
                    self.control
                        .request_stop(format!("spawning vCPU {index}'s thread failed: {e}"));
                    for never in index..self.params.len() {
                        if self.done_before.get(never).is_none_or(Option::is_none) {
                            self.control.unregister(never);
                        }
                    }
                    bail!(
                        "micro-VM {}: spawning vCPU {index}'s thread: {e}",
                        self.spec.name
                    );
                }
            }
        }
        let control = self.control.clone();
        let deadline = Instant::now() + self.spec.time_limit.saturating_sub(self.ran_before);
        let limit = self.spec.time_limit;
        self.watchdog = Some(
            std::thread::Builder::new()
                .name(format!("disco-{}-watchdog", self.spec.name))
                .spawn(move || {
                    if !control.wait_exited(deadline) {
                        control.request_stop(format!("time limit of {limit:?} exceeded"));
                    }
                })
                .with_context(|| format!("micro-VM {}: spawning the watchdog", self.spec.name))?,
        );
        Ok(())
    }

    /// (done, total) progress summed over the vCPUs, read from their
    /// parameter blocks in guest RAM.
    pub fn progress(&self) -> (u64, u64) {
        let done = self
            .params
            .iter()
            .map(|p| self.ram.read_u64(p.progress_addr()).unwrap_or(0))
            .sum();
        (done, self.totals.iter().sum())
    }

    /// Whether every vCPU thread has exited.
    pub fn is_finished(&self) -> bool {
        self.started_at.is_some() && self.control.all_exited()
    }

    /// Asks all vCPUs to stop; they are kicked out of `KVM_RUN` and report
    /// their state as failures. Returns at once; `wait` collects them.
    pub fn stop(&self) {
        self.control.request_stop("stop requested".into());
    }

    /// [`Self::stop`] with the reason the report gives (`stopped: REASON`).
    pub fn stop_because(&self, reason: &str) {
        self.control.request_stop(reason.into());
    }

    /// Joins the vCPU threads and reports, with each result checked against
    /// the model. A VM never started reports every vCPU as not run.
    pub fn wait(mut self) -> VmOutcome {
        let mut vcpus: Vec<VcpuOutcome> = if self.started_at.is_none() {
            vec![VcpuOutcome::NotRun; self.params.len()]
        } else {
            self.join()
        };
        // The host model takes as long as the guest's whole work: only for
        // a VM with a result to check (not one stopped or failed early).
        if vcpus.iter().any(|o| matches!(o, VcpuOutcome::Done { .. })) {
            let expected = model::expected_results(&self.spec.workload, &self.params);
            for (outcome, want) in vcpus.iter_mut().zip(expected) {
                if let VcpuOutcome::Done { expected, .. } = outcome {
                    *expected = want;
                }
            }
        }
        let run_time = match (self.started_at, self.control.finished_at()) {
            (Some(start), Some(end)) => end.saturating_duration_since(start) + self.ran_before,
            _ => self.ran_before,
        };
        VmOutcome {
            name: self.spec.name.clone(),
            vcpus,
            run_time,
            vcpu_cpu: self.control.vcpu_cpu(),
            log: std::mem::take(&mut *self.log.lock()),
        }
    }

    /// Joins the vCPU threads and the watchdog; vCPUs done before a
    /// snapshot report their result from then.
    fn join(&mut self) -> Vec<VcpuOutcome> {
        let mut ran = crate::vm::vcpu::join_vcpu_threads(
            std::mem::take(&mut self.threads),
            self.watchdog.take(),
        )
        .into_iter();
        (0..self.params.len())
            .map(|i| match self.done_before.get(i).copied().flatten() {
                Some(result) => VcpuOutcome::Done {
                    result,
                    expected: None,
                },
                None => ran.next().unwrap_or(VcpuOutcome::NotRun),
            })
            .collect()
    }

    /// The VM's state apart from its memory, for a snapshot. The caller
    /// has paused the VM (`pauser().pause()`) and keeps it paused while it
    /// reads the memory.
    pub fn capture_state(&self) -> anyhow::Result<MicroVmState> {
        let name = &self.spec.name;
        let Some(started) = self.started_at else {
            bail!("micro-VM {name} has not started");
        };
        let vcpus = self
            .control
            .capture_parked()
            .map_err(|e| anyhow::anyhow!("micro-VM {name}: capturing its vCPUs: {e}"))?;
        Ok(MicroVmState {
            vcpus,
            log: self.log.lock().clone(),
            run_time_ns: (self.ran_before + started.elapsed()).as_nanos() as u64,
            progress: self.progress(),
        })
    }

    /// The VM's spec (name, vCPU placement, workload, time limit).
    pub fn spec(&self) -> &MicroVmSpec {
        &self.spec
    }

    /// The vCPUs' parameters, in vCPU order.
    pub fn params(&self) -> &[VcpuParams] {
        &self.params
    }

    /// A handle the memory mapper uses to hold this VM's vCPUs outside
    /// `KVM_RUN` while it changes a mapping that must not be accessed
    /// half-made (see `Memory::set_pauser`).
    /// Kernel thread id of each vCPU's thread while it runs (`None` before
    /// it started and after it exited).
    pub fn vcpu_tids(&self) -> Vec<Option<u32>> {
        self.control.tids()
    }

    /// Moves vCPU `index` to `placement` while it runs: re-pins its thread
    /// to the placement's host CPUs. Its pages follow only if the NUMA
    /// policy migrates them.
    pub fn move_vcpu(&mut self, index: usize, placement: VcpuPlacement) -> anyhow::Result<()> {
        let name = &self.spec.name;
        if index >= self.spec.vcpus.len() {
            bail!("micro-VM {name} has no vCPU {index}");
        }
        if let Some(Some(tid)) = self.control.tids().get(index) {
            vcpu::pin_thread(*tid as i32, &placement.host_cpus)
                .map_err(|e| anyhow::anyhow!("micro-VM {name}: moving vCPU {index}: {e}"))?;
        }
        self.spec.vcpus[index] = placement;
        Ok(())
    }

    /// Where each vCPU runs now.
    pub fn placements(&self) -> &[VcpuPlacement] {
        &self.spec.vcpus
    }

    pub fn pauser(&self) -> Arc<dyn crate::memory::GuestPause> {
        self.control.clone()
    }

    /// The KVM VM (for dirty logging and the like).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The guest RAM this VM runs on (memory slot 0, e.g. to re-register it
    /// with dirty logging).
    pub fn ram(&self) -> GuestRam {
        self.ram
    }

    /// Turns KVM's dirty logging of guest RAM (slot 0) on or off: slot 0
    /// registered again with or without `KVM_MEM_LOG_DIRTY_PAGES`. While
    /// on, KVM write-protects the guest's mappings in its own page tables
    /// and records each frame the guest writes (live migration's dirty
    /// tracking, `crate::migration`); the monitor's mappings are untouched.
    pub fn set_dirty_logging(&self, on: bool) -> anyhow::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.ram.size as u64,
            userspace_addr: self.ram.host_addr as u64,
        };
        // SAFETY: the same mapping as slot 0 was registered with, which
        // the caller keeps valid for the VM's life.
        unsafe { self.vm.set_user_memory_region(region) }.with_context(|| {
            format!(
                "micro-VM {}: turning dirty logging {}",
                self.spec.name,
                if on { "on" } else { "off" }
            )
        })
    }

    /// The frames the guest wrote since dirty logging was turned on or
    /// since the last call (`KVM_GET_DIRTY_LOG`, which also clears the
    /// log): one bit per frame, 64 frames a word.
    pub fn take_dirty_log(&self) -> anyhow::Result<Vec<u64>> {
        self.vm
            .get_dirty_log(0, self.ram.size)
            .with_context(|| format!("micro-VM {}: reading the dirty log", self.spec.name))
    }
}

impl Drop for MicroVm {
    /// A VM dropped without `wait` is stopped and joined, so no vCPU thread
    /// outlives the caller's RAM mapping.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.request_stop("the VM was dropped".into());
            self.join();
        }
    }
}
