//! The virtio-mmio transport (virtio 1.x, "version 2" register layout):
//! the registers a driver programs, split virtqueues (virtio-queue) over
//! the guest's RAM, and an interrupt line (an irqfd eventfd).
//!
//! A device implements [`VirtioDevice`]; the transport calls its
//! [`VirtioDevice::process`] when the driver notifies a queue (or the host
//! has new input, [`VirtioMmio::host_notify`]) and raises the used-buffer
//! interrupt when the device used buffers and the driver wants to hear.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const VENDOR: u32 = 0x4f43_5344; // "DSCO"
/// VIRTIO_F_VERSION_1: a modern (1.x) device.
pub const F_VERSION_1: u64 = 1 << 32;
/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;
/// Interrupt status bit: the device used buffers.
pub const INT_VRING: u32 = 1;

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 block, 3 console).
    fn device_type(&self) -> u32;
    /// Device feature bits (the transport adds VERSION_1).
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_sizes(&self) -> Vec<u16>;
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Consumes queue `index`'s available buffers; returns whether it put
    /// any on the used ring.
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// What the device holds besides its queues, for a snapshot (nothing
    /// by default: a block device's state is its file).
    fn saved_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back what [`Self::saved_state`] gave.
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        match state.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "{} bytes of state for a device that keeps none",
                state.len()
            )),
        }
    }
}

/// serde for one virtqueue's registers and ring positions
/// (`virtio_queue::QueueState` has none): its fields, by name.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// `#[serde(with)]` for a list of queue states, through [`QueueStateDef`].
mod queue_states {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use virtio_queue::QueueState;

    #[derive(Serialize, Deserialize)]
    struct Each(#[serde(with = "super::QueueStateDef")] QueueState);

    pub fn serialize<S: Serializer>(queues: &[QueueState], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(queues.iter().map(|&q| Each(q)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<QueueState>, D::Error> {
        Ok(Vec::<Each>::deserialize(d)?
            .into_iter()
            .map(|e| e.0)
            .collect())
    }
}

/// A virtio-mmio device's transport registers, queues and device state,
/// for a snapshot. Taken with the vCPUs parked: a device works only in a
/// vCPU's exit, so no request is half-served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    #[serde(with = "queue_states")]
    pub queues: Vec<QueueState>,
    pub device: Vec<u8>,
}

/// One virtio-mmio device: registers, queues, interrupt line.
pub struct VirtioMmio {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Interrupts raised (for tests and statistics).
    pub interrupts: u64,
}

fn le32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl VirtioMmio {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFd) -> VirtioMmio {
        let queues = device
            .queue_sizes()
            .into_iter()
            .map(|n| Queue::new(n).expect("queue sizes are powers of two"))
            .collect();
        VirtioMmio {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            interrupts: 0,
        }
    }

    fn all_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// A driver's read of `data.len()` bytes at register `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.all_features() as u32,
                1 => (self.all_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A driver's write of `data` at register `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            return; // block and console config are read-only here
        }
        let v = le32(data);
        let sel = self.queue_sel as usize;
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | (((v as u64) << shift) & self.all_features());
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if setup => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if setup => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if setup => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let (lo, hi) = split(offset == reg::QUEUE_DESC_LOW, v);
                    q.set_desc_table_address(lo, hi);
                }
            }
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH if setup => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let (lo, hi) = split(offset == reg::QUEUE_AVAIL_LOW, v);
                    q.set_avail_ring_address(lo, hi);
                }
            }
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH if setup => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let (lo, hi) = split(offset == reg::QUEUE_USED_LOW, v);
                    q.set_used_ring_address(lo, hi);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
                        // A legacy driver: refuse (clear FEATURES_OK).
                        self.status &= !STATUS_FEATURES_OK;
                    }
                }
            }
            _ => {}
        }
    }

    /// The driver notified queue `index`.
    fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() || !queue.is_valid(&self.mem) {
            return;
        }
        if self.device.process(index, queue, &self.mem) {
            let wanted = queue.needs_notification(&self.mem).unwrap_or(true);
            if wanted {
                self.interrupt_status |= INT_VRING;
                self.interrupts += 1;
                if let Err(e) = self.irq.write(1) {
                    tracing::warn!("virtio interrupt: {e}");
                }
            }
        }
    }

    /// The host has something for queue `index` (e.g. console input):
    /// processes it as if the driver had notified.
    pub fn host_notify(&mut self, index: usize) {
        self.notify(index)
    }

    /// The transport's and the device's state, for a snapshot.
    pub fn state(&self) -> VirtioMmioState {
        VirtioMmioState {
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            device: self.device.saved_state(),
        }
    }

    /// Puts a saved state into this fresh device, which must be of the
    /// same kind with the same queues.
    pub fn set_state(&mut self, state: &VirtioMmioState) -> Result<(), String> {
        let kind = self.device.device_type();
        if state.device_type != kind {
            return Err(format!(
                "a virtio device of type {} saved where this VM has type {kind}",
                state.device_type
            ));
        }
        let sizes = self.device.queue_sizes();
        let saved: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if saved != sizes {
            return Err(format!(
                "virtio device of type {kind}: queues of {saved:?} entries saved, the device has \
                 {sizes:?}"
            ));
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(*q)
                    .map_err(|e| format!("virtio device of type {kind}, queue {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device
            .load_state(&state.device)
            .map_err(|e| format!("virtio device of type {kind}: {e}"))?;
        self.queues = queues;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        Ok(())
    }

    /// The device, e.g. to hand input to a console.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }
}

fn split(low: bool, v: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(v), None)
    } else {
        (None, Some(v))
    }
}
