//! A Linux VM's state outside its memory, for snapshots, restores and
//! clones: what KVM holds for the VM (the in-kernel irqchip's two PICs and
//! IOAPIC, the PIT, the kvm-clock) and for each vCPU (registers, LAPIC,
//! every MSR KVM saves: `crate::vm::VcpuState`), and what the monitor's
//! devices hold (the 16550's registers and FIFO, each virtio-mmio device's
//! transport registers, queue positions and pending console input).
//!
//! All of it is taken with the VM paused: each vCPU by its own parked
//! thread, the rest by the caller. A device works only inside a vCPU's
//! exit, so with every vCPU parked no request is half-served and the
//! device state agrees with the rings in guest memory.
//!
//! Disks: a snapshot holds memory, not disk contents. A read-only disk is
//! named with its size and modification time, and a restore refuses a
//! disk that changed since; a VM with a writable disk is refused (its disk
//! would go on changing under the snapshot).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::loader::Loaded;
use super::mmio::VirtioMmioState;
use super::{DiskConfig, LinuxGuestConfig, LinuxVm};
use crate::vm::{VcpuSnapshot, VcpuState};

/// The console output a snapshot keeps (its last bytes), so a restored
/// VM's report and console text go on from where the snapshot's were.
pub const CONSOLE_KEPT: usize = 64 << 10;

/// The in-kernel irqchip's parts, as `KVM_GET_IRQCHIP` numbers them.
pub const PIC_MASTER: u32 = 0;
pub const PIC_SLAVE: u32 = 1;
pub const IOAPIC: u32 = 2;

/// serde for the 16550's registers and receive FIFO
/// (`vm_superio::serial::SerialState` has none): its fields, by name.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// A read-only disk as the snapshot saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time, nanoseconds since the epoch.
    pub modified_ns: u128,
}

impl DiskIdentity {
    fn of(path: &Path) -> Result<DiskIdentity> {
        let meta = std::fs::metadata(path).with_context(|| format!("disk {}", path.display()))?;
        Ok(DiskIdentity {
            path: path.to_path_buf(),
            bytes: meta.len(),
            modified_ns: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
        })
    }
}

/// Everything of a Linux VM a restore needs besides its memory and its
/// spec (`crate::snapshot::VmMeta`).
#[derive(Debug, Serialize, Deserialize)]
pub struct LinuxVmState {
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchip: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// One per virtio-mmio slot, in slot order (disks, then the console).
    pub virtio: Vec<VirtioMmioState>,
    pub disks: Vec<DiskIdentity>,
    /// The command line the guest booted with and where its kernel was
    /// loaded (for reports: the restored VM does not load them again).
    pub cmdline: String,
    pub loaded: Loaded,
    /// The last [`CONSOLE_KEPT`] bytes of console output.
    pub console: Vec<u8>,
    /// How long it had run (counts against its time limit and in its run
    /// time after a restore).
    pub run_time_ns: u64,
}

impl LinuxVm {
    /// The VM's state apart from its memory, for a snapshot. The caller
    /// has paused the VM (`pauser().pause()`) and keeps it paused while it
    /// reads the memory. A VM with a writable disk is refused.
    pub fn capture_state(&self) -> Result<LinuxVmState> {
        let name = &self.spec.name;
        let ctx = || format!("Linux VM {name}");
        let Some(started) = self.started_at else {
            bail!("{}: has not started", ctx());
        };
        let disks = self
            .spec
            .guest
            .disks
            .iter()
            .map(|d: &DiskConfig| {
                if !d.read_only {
                    bail!(
                        "{}: disk {} is writable, and a snapshot holds memory, not disk \
                         contents (the disk would go on changing under it); allowed: VMs whose \
                         disks are all `read_only = true`",
                        ctx(),
                        d.path.display()
                    );
                }
                DiskIdentity::of(&d.path)
            })
            .collect::<Result<Vec<_>>>()?;
        let vcpus = self
            .control
            .capture_parked()
            .map_err(|e| anyhow::anyhow!("{}: capturing its vCPUs: {e}", ctx()))?
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                VcpuSnapshot::Running(state) => Ok(*state),
                VcpuSnapshot::Done { .. } => bail!("{}: vCPU {i} has ended", ctx()),
            })
            .collect::<Result<Vec<_>>>()?;
        let irqchip = [PIC_MASTER, PIC_SLAVE, IOAPIC]
            .into_iter()
            .map(|chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.vm
                    .get_irqchip(&mut chip)
                    .with_context(|| format!("{}: KVM_GET_IRQCHIP {chip_id}", ctx()))?;
                Ok(chip)
            })
            .collect::<Result<Vec<_>>>()?;
        let pit = self
            .vm
            .get_pit2()
            .context("KVM_GET_PIT2")
            .with_context(ctx)?;
        let mut clock = self
            .vm
            .get_clock()
            .context("KVM_GET_CLOCK")
            .with_context(ctx)?;
        // The guest's clock goes on from the value it had; KVM_SET_CLOCK
        // takes no flags from KVM_GET_CLOCK's report (TSC_STABLE,
        // REALTIME and HOST_TSC describe this host's clock, not the VM's).
        clock.flags = 0;
        Ok(LinuxVmState {
            vcpus,
            irqchip,
            pit,
            clock,
            serial: self.devices.serial.lock().state(),
            virtio: self
                .devices
                .virtio
                .iter()
                .map(|d| d.lock().state())
                .collect(),
            disks,
            cmdline: self.cmdline.clone(),
            loaded: self.loaded,
            console: self.sink.tail(CONSOLE_KEPT),
            run_time_ns: (self.ran_before + started.elapsed()).as_nanos() as u64,
        })
    }
}

impl LinuxVmState {
    /// Checks that the state fits a VM of `vcpus` vCPUs with `guest`'s
    /// devices, whose read-only disks are unchanged since.
    pub fn check_fits(&self, vcpus: usize, guest: &LinuxGuestConfig) -> Result<()> {
        let (virtio, disks) = (guest.virtio_devices(), &guest.disks);
        if self.vcpus.len() != vcpus {
            bail!("{} vCPU states saved for {vcpus} vCPUs", self.vcpus.len());
        }
        if self.virtio.len() != virtio {
            bail!(
                "{} virtio devices saved, the VM has {virtio}",
                self.virtio.len()
            );
        }
        if self.irqchip.len() != 3 {
            bail!("{} irqchip parts saved; a PC has 3", self.irqchip.len());
        }
        if self.disks.len() != disks.len() {
            bail!(
                "{} disks saved, the VM has {}",
                self.disks.len(),
                disks.len()
            );
        }
        for (saved, disk) in self.disks.iter().zip(disks) {
            let now = DiskIdentity::of(&disk.path)?;
            if &now != saved {
                bail!(
                    "disk {} changed since the snapshot ({} bytes, modified at {} ns then; {} \
                     bytes, modified at {} ns now)",
                    disk.path.display(),
                    saved.bytes,
                    saved.modified_ns,
                    now.bytes,
                    now.modified_ns
                );
            }
        }
        Ok(())
    }
}
