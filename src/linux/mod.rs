//! Linux guests: an unmodified kernel (ELF vmlinux or bzImage) with an
//! optional initramfs, on RAM from the monitor's pools like any micro-guest
//! (same `Memory`, pmap and memmap, so sharing and NUMA placement apply).
//!
//! * [`layout`]: guest-physical layout, e820 map, guest NUMA plan;
//! * [`loader`]: kernel, initramfs, command line, zero page, boot tables;
//! * [`acpi`]: RSDP, XSDT, MADT, SRAT, SLIT;
//! * [`cpu`]: CPUID, MSRs, LAPIC, 64-bit entry state;
//! * [`serial`]: COM1 (vm-superio 16550) and the console sink;
//! * [`mmio`]: the virtio-mmio transport; [`block`] and [`console`]: devices;
//! * [`vcpu`]: the vCPU thread and its exits;
//! * [`state`]: the VM's state besides memory, for snapshots and clones.
//!
//! [`build`] makes a VM from a `[[vm]]` config: guest space in the pools,
//! each guest NUMA node's slice of RAM moved to its node's pool, then
//! [`LinuxVm::create`]. Start, stop and wait work as for micro-VMs;
//! [`LinuxVm::restore`] makes a VM that goes on from a captured state.

pub mod acpi;
pub mod block;
pub mod console;
pub mod cpu;
pub mod layout;
pub mod loader;
pub mod mmio;
pub mod serial;
pub mod state;
pub mod vcpu;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use parking_lot::Mutex;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::memory::{Memory, VmId};
use crate::topology::Topology;
use crate::vm::control::VmControl;
use crate::vm::{GuestRam, VcpuOutcome, VcpuPlacement, VmOutcome};
pub use layout::{NumaPlan, MAX_CMDLINE};
use mmio::VirtioMmio;
use serial::{ConsoleSink, IrqLine, SerialPort, COM1, COM1_LEN};
pub use state::LinuxVmState;

pub use crate::config::linux::{
    DiskConfig, LinuxGuestConfig, SerialOutput, MAX_MEMORY_MIB, MIN_MEMORY_MIB, SECTOR_BYTES,
};

/// The command line used when the config gives none: serial console from
/// the first instruction on, reset through the keyboard controller.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 no_timer_check";

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxVmSpec {
    pub name: String,
    pub vcpus: Vec<VcpuPlacement>,
    pub guest: LinuxGuestConfig,
    pub numa: NumaPlan,
    pub time_limit: Duration,
}

/// Devices reached by port I/O and MMIO exits.
pub struct Devices {
    serial: Mutex<SerialPort>,
    virtio: Vec<Mutex<VirtioMmio>>,
}

impl Devices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1..COM1 + COM1_LEN).contains(&port) && data.len() == 1 {
            data[0] = self.serial.lock().read((port - COM1) as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if (COM1..COM1 + COM1_LEN).contains(&port) && data.len() == 1 {
            if let Err(e) = self.serial.lock().write((port - COM1) as u8, data[0]) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<VirtioMmio>, u64)> {
        let off = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let i = (off / layout::VIRTIO_MMIO_SIZE) as usize;
        self.virtio
            .get(i)
            .map(|d| (d, off % layout::VIRTIO_MMIO_SIZE))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((d, off)) => d.lock().read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.virtio_at(addr) {
            d.lock().write(off, data);
        }
    }
}

/// A Linux VM.
pub struct LinuxVm {
    spec: LinuxVmSpec,
    ram: GuestRam,
    vm: VmFd,
    control: Arc<VmControl>,
    devices: Arc<Devices>,
    sink: ConsoleSink,
    guest_ended: Arc<AtomicBool>,
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<VcpuOutcome>>,
    watchdog: Option<JoinHandle<()>>,
    started_at: Option<Instant>,
    /// Run time before a restore (counts against the time limit).
    ran_before: Duration,
    cmdline: String,
    loaded: loader::Loaded,
    /// The MSRs KVM saves (`KVM_GET_MSR_INDEX_LIST`), which a snapshot
    /// reads from each vCPU.
    msrs: Arc<[u32]>,
}

/// The command line the guest gets: the configured one or
/// [`DEFAULT_CMDLINE`]. Virtio devices are announced in the ACPI DSDT, not
/// here: Debian's kernel is built without `virtio_mmio.device=` support.
pub fn full_cmdline(guest: &LinuxGuestConfig) -> String {
    guest
        .cmdline
        .as_deref()
        .unwrap_or(DEFAULT_CMDLINE)
        .to_string()
}

impl LinuxVm {
    /// Creates the VM on `ram` (which the caller keeps mapped until this VM
    /// is dropped or waited for): KVM VM with in-kernel irqchip and PIT,
    /// RAM as slot 0, kernel, initramfs, boot tables and ACPI loaded,
    /// devices, vCPUs.
    pub fn create(kvm: &Kvm, spec: LinuxVmSpec, ram: GuestRam) -> Result<LinuxVm> {
        LinuxVm::build(kvm, spec, ram, None)
    }

    /// A VM that goes on from `state` on `ram`, which already holds the
    /// snapshot's memory (kernel, page tables, rings as the captured VM
    /// left them): nothing is loaded; the irqchip, PIT, clock, devices and
    /// vCPUs get the saved states.
    pub fn restore(
        kvm: &Kvm,
        spec: LinuxVmSpec,
        ram: GuestRam,
        state: &LinuxVmState,
    ) -> Result<LinuxVm> {
        let mut vm = LinuxVm::build(kvm, spec, ram, Some(state))?;
        vm.ran_before = Duration::from_nanos(state.run_time_ns);
        Ok(vm)
    }

    fn build(
        kvm: &Kvm,
        spec: LinuxVmSpec,
        ram: GuestRam,
        restored: Option<&LinuxVmState>,
    ) -> Result<LinuxVm> {
        let name = spec.name.clone();
        let ctx = || match restored {
            None => format!("creating Linux VM {name}"),
            Some(_) => format!("restoring Linux VM {name}"),
        };
        let size = ram.size as u64;
        if !(MIN_MEMORY_MIB << 20..=layout::RAM_LIMIT).contains(&size) {
            bail!(
                "{}: {} MiB of RAM; allowed {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
                ctx(),
                size >> 20
            );
        }
        let nvirtio = spec.guest.virtio_devices();
        if nvirtio > layout::MAX_VIRTIO {
            bail!(
                "{}: {nvirtio} virtio devices; at most {}",
                ctx(),
                layout::MAX_VIRTIO
            );
        }
        if let Some(state) = restored {
            state
                .check_fits(spec.vcpus.len(), &spec.guest)
                .with_context(ctx)?;
        }
        crate::vm::control::install_kick_handler()?;
        let mem = loader::guest_memory(&ram).with_context(ctx)?;
        let (cmdline, loaded) = match restored {
            Some(state) => (state.cmdline.clone(), state.loaded),
            None => {
                let cmdline = full_cmdline(&spec.guest);
                let tables =
                    acpi::build(spec.vcpus.len(), &spec.numa, nvirtio).with_context(ctx)?;
                let loaded = loader::load(
                    &mem,
                    size,
                    &spec.guest.kernel,
                    spec.guest.initramfs.as_deref(),
                    &cmdline,
                    &tables,
                )
                .with_context(ctx)?;
                (cmdline, loaded)
            }
        };

        let vm = kvm.create_vm().context("KVM_CREATE_VM").with_context(ctx)?;
        vm.set_tss_address(0xfffb_d000)
            .context("KVM_SET_TSS_ADDR")
            .with_context(ctx)?;
        vm.create_irq_chip()
            .context("KVM_CREATE_IRQCHIP")
            .with_context(ctx)?;
        vm.create_pit2(kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .context("KVM_CREATE_PIT2")
        .with_context(ctx)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: ram.host_addr as u64,
        };
        // SAFETY: the caller keeps the mapping valid for the VM's life.
        unsafe { vm.set_user_memory_region(region) }
            .context("registering guest RAM as memory slot 0")
            .with_context(ctx)?;

        let sink = ConsoleSink::new(&spec.name, &spec.guest.serial).with_context(ctx)?;
        if let Some(state) = restored {
            sink.preload(&state.console);
        }
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .context("KVM_IRQFD for the serial port")
            .with_context(ctx)?;
        let mut virtio = Vec::new();
        let mut add = |dev: Box<dyn mmio::VirtioDevice>| -> Result<()> {
            let irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
            vm.register_irqfd(&irq, layout::VIRTIO_IRQ_BASE + virtio.len() as u32)
                .context("KVM_IRQFD for a virtio device")?;
            let mut device = VirtioMmio::new(dev, mem.clone(), irq);
            if let Some(state) = restored {
                device
                    .set_state(&state.virtio[virtio.len()])
                    .map_err(anyhow::Error::msg)?;
            }
            virtio.push(Mutex::new(device));
            Ok(())
        };
        for d in &spec.guest.disks {
            add(Box::new(block::Block::open(&d.path, d.read_only)?)).with_context(ctx)?;
        }
        if spec.guest.virtio_console {
            add(Box::new(console::Console::new(sink.clone()))).with_context(ctx)?;
        }
        let serial = match restored {
            None => serial::serial_port(serial_irq, sink.clone()),
            Some(state) => SerialPort::from_state(
                &state.serial,
                IrqLine(serial_irq),
                vm_superio::serial::NoEvents,
                sink.clone(),
            )
            .map_err(|e| anyhow::anyhow!("{}: the serial port's saved state: {e:?}", ctx()))?,
        };
        let devices = Arc::new(Devices {
            serial: Mutex::new(serial),
            virtio,
        });
        let msrs: Arc<[u32]> = kvm
            .get_msr_index_list()
            .context("KVM_GET_MSR_INDEX_LIST")
            .with_context(ctx)?
            .as_slice()
            .into();

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")
            .with_context(ctx)?;
        let n = spec.vcpus.len();
        let vcpus = (0..n)
            .map(|i| {
                let vcpu = vm
                    .create_vcpu(i as u64)
                    .with_context(|| format!("creating vCPU {i}"))?;
                let cpuid = cpu::cpuid_for(&supported, i, n);
                cpu::setup_common(&vcpu, &cpuid).with_context(|| format!("setting up vCPU {i}"))?;
                if restored.is_none() && i == 0 {
                    cpu::setup_boot_vcpu(&vcpu, loaded.entry)
                        .context("setting up the boot vCPU")?;
                }
                Ok((vcpu, cpuid))
            })
            .collect::<Result<Vec<_>>>()
            .with_context(ctx)?;
        if let Some(state) = restored {
            // VM-wide state first, then each vCPU (its LAPIC and MSRs on
            // top of the irqchip).
            vm.set_pit2(&state.pit)
                .context("KVM_SET_PIT2")
                .with_context(ctx)?;
            vm.set_clock(&state.clock)
                .context("KVM_SET_CLOCK")
                .with_context(ctx)?;
            for chip in &state.irqchip {
                vm.set_irqchip(chip)
                    .with_context(|| format!("KVM_SET_IRQCHIP {}", chip.chip_id))
                    .with_context(ctx)?;
            }
            for (i, ((vcpu, cpuid), saved)) in vcpus.iter().zip(&state.vcpus).enumerate() {
                saved
                    .apply(vcpu, cpuid)
                    .map_err(|e| anyhow::anyhow!("{}: vCPU {i}: {e}", ctx()))?;
            }
        }
        Ok(LinuxVm {
            control: Arc::new(VmControl::new(n)),
            spec,
            ram,
            vm,
            devices,
            sink,
            guest_ended: Arc::default(),
            vcpus: vcpus.into_iter().map(|(v, _)| v).collect(),
            threads: Vec::new(),
            watchdog: None,
            started_at: None,
            ran_before: Duration::ZERO,
            cmdline,
            loaded,
            msrs,
        })
    }

    /// Spawns the vCPU threads (`disco-<vm>-vcpu<i>`, pinned) and the
    /// time-limit watchdog.
    pub fn start(&mut self) -> Result<()> {
        if self.started_at.is_some() {
            bail!("Linux VM {} is already started", self.spec.name);
        }
        self.started_at = Some(Instant::now());
        let vcpus = std::mem::take(&mut self.vcpus);
        let n = vcpus.len();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let t = vcpu::LinuxVcpu {
                index,
                vcpu,
                placement: self.spec.vcpus[index].clone(),
                ram: self.ram,
                control: self.control.clone(),
                devices: self.devices.clone(),
                guest_ended: self.guest_ended.clone(),
                msrs: self.msrs.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("disco-{}-vcpu{index}", self.spec.name))
                .spawn(move || t.run())
            {
                Ok(h) => self.threads.push(h),
                Err(e) => {
                    self.control
                        .request_stop(format!("spawning vCPU {index}'s thread failed: {e}"));
                    for never in index..n {
                        self.control.unregister(never);
                    }
                    bail!("Linux VM {}: spawning vCPU {index}: {e}", self.spec.name);
                }
            }
        }
        let control = self.control.clone();
        let limit = self.spec.time_limit;
        let deadline = Instant::now() + limit.saturating_sub(self.ran_before);
        self.watchdog = Some(
            std::thread::Builder::new()
                .name(format!("disco-{}-watchdog", self.spec.name))
                .spawn(move || {
                    if !control.wait_exited(deadline) {
                        control.request_stop(format!("time limit of {limit:?} exceeded"));
                    }
                })
                .context("spawning the watchdog")?,
        );
        Ok(())
    }

    /// Whether every vCPU thread has exited.
    pub fn is_finished(&self) -> bool {
        self.started_at.is_some() && self.control.all_exited()
    }

    /// Stops the VM (its vCPUs report as stopped); `wait` collects them.
    pub fn stop(&self) {
        self.control.request_stop("stop requested".into());
    }

    /// [`Self::stop`] with the reason the report gives (`stopped: REASON`).
    pub fn stop_because(&self, reason: &str) {
        self.control.request_stop(reason.into());
    }

    /// The console output so far (serial and virtio console).
    pub fn console_text(&self) -> String {
        self.sink.text()
    }

    /// The kernel command line the guest was given.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Where the kernel and initramfs were loaded.
    pub fn loaded(&self) -> loader::Loaded {
        self.loaded
    }

    /// The guest NUMA plan announced in the SRAT.
    pub fn numa(&self) -> &NumaPlan {
        &self.spec.numa
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// A handle to pause the vCPUs (for `Memory::set_pauser`).
    pub fn pauser(&self) -> Arc<dyn crate::memory::GuestPause> {
        self.control.clone()
    }

    /// Joins the vCPU threads and reports; the log is the console's last
    /// lines.
    pub fn wait(mut self) -> VmOutcome {
        let vcpus = if self.started_at.is_none() {
            vec![VcpuOutcome::NotRun; self.spec.vcpus.len()]
        } else {
            self.join()
        };
        let run_time = self.ran_before
            + match (self.started_at, self.control.finished_at()) {
                (Some(s), Some(e)) => e.saturating_duration_since(s),
                _ => Duration::ZERO,
            };
        let text = self.sink.text();
        let lines: Vec<&str> = text.lines().collect();
        let log = lines[lines.len().saturating_sub(20)..]
            .iter()
            .map(|l| format!("console: {}", l.trim_end_matches('\r')))
            .collect();
        VmOutcome {
            name: self.spec.name.clone(),
            vcpus,
            run_time,
            vcpu_cpu: self.control.vcpu_cpu(),
            log,
        }
    }

    fn join(&mut self) -> Vec<VcpuOutcome> {
        crate::vm::vcpu::join_vcpu_threads(std::mem::take(&mut self.threads), self.watchdog.take())
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.request_stop("the VM was dropped".into());
            self.join();
        }
    }
}

/// The spec a `[[vm]]` with a `kernel` describes.
pub fn spec_for(vc: &VmConfig, topology: &Topology) -> Result<LinuxVmSpec> {
    let guest = vc
        .linux
        .clone()
        .ok_or_else(|| anyhow::anyhow!("VM {} names no kernel", vc.name))?;
    Ok(LinuxVmSpec {
        name: vc.name.clone(),
        vcpus: vc
            .vcpu_nodes
            .iter()
            .map(|&node| VcpuPlacement {
                node,
                host_cpus: topology.nodes[node].host_cpus.clone(),
            })
            .collect(),
        numa: NumaPlan::new(&vc.vcpu_nodes, vc.memory_mib << 20, |a, b| {
            topology.distance(a, b)
        }),
        guest,
        time_limit: vc.time_limit,
    })
}

/// Builds a Linux VM: its guest space in the first guest node's pool, the
/// other guest nodes' slices moved to their own pools (so the SRAT tells
/// the truth), then the VM. On failure nothing is left behind.
pub fn build(
    kvm: &Kvm,
    memory: &Memory,
    topology: &Topology,
    vc: &VmConfig,
) -> Result<(VmId, LinuxVm)> {
    let spec = spec_for(vc, topology)?;
    let frames = vc.memory_mib * 1024 * 1024 / crate::PAGE_SIZE as u64;
    let first = spec.numa.nodes[0].topology_node;
    let (space, base) = memory
        .create_space_in(&vc.name, frames, first, &vc.sharing_domain)
        .context("cannot build guest memory")?;
    let result = (|| -> Result<LinuxVm> {
        for i in 1..spec.numa.nodes.len() {
            let node = spec.numa.nodes[i].topology_node;
            for gfn in spec.numa.frames(i) {
                // Still zero: replace with a fresh page of the node's pool.
                memory
                    .unmap_page(space, gfn)
                    .and_then(|()| memory.map_page(space, gfn, node).map(drop))
                    .with_context(|| format!("placing guest frame {gfn:#x} on node {node}"))?;
            }
        }
        let ram = GuestRam {
            host_addr: base,
            size: frames as usize * crate::PAGE_SIZE,
        };
        let vm = LinuxVm::create(kvm, spec, ram)?;
        memory.set_pauser(space, vm.pauser())?;
        Ok(vm)
    })();
    match result {
        Ok(vm) => Ok((space, vm)),
        Err(e) => {
            memory.destroy_space(space)?;
            Err(e.context("cannot create the Linux VM"))
        }
    }
}
