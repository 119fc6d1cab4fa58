//! virtio-console with one port (no MULTIPORT): queue 0 receives (host to
//! guest input), queue 1 transmits (guest output to the VM's console sink).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::mmio::VirtioDevice;
use super::serial::ConsoleSink;

pub const DEVICE_CONSOLE: u32 = 3;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 64;

pub struct Console {
    sink: ConsoleSink,
    input: Arc<Mutex<VecDeque<u8>>>,
}

impl Console {
    pub fn new(sink: ConsoleSink) -> Console {
        Console {
            sink,
            input: Arc::default(),
        }
    }

    /// Bytes waiting for the guest; push to it, then have the transport
    /// process [`RX_QUEUE`] (`VirtioMmio::host_notify`).
    pub fn input(&self) -> Arc<Mutex<VecDeque<u8>>> {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_CONSOLE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// The input not yet given to the guest.
    fn saved_state(&self) -> Vec<u8> {
        self.input.lock().iter().copied().collect()
    }
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        *self.input.lock() = state.iter().copied().collect();
        Ok(())
    }
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX_QUEUE {
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                for d in chain.filter(|d| !d.is_write_only()) {
                    let mut buf = vec![0u8; d.len() as usize];
                    if mem.read_slice(&mut buf, d.addr()).is_ok() {
                        self.sink.put(&buf);
                    }
                }
                if queue.add_used(mem, head, 0).is_err() {
                    break;
                }
                used = true;
            }
        } else if index == RX_QUEUE {
            let mut input = self.input.lock();
            while !input.is_empty() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0u32;
                for d in chain.filter(|d| d.is_write_only()) {
                    let n = (d.len() as usize).min(input.len());
                    let bytes: Vec<u8> = input.drain(..n).collect();
                    if mem.write_slice(&bytes, d.addr()).is_err() {
                        break;
                    }
                    written += n as u32;
                    if input.is_empty() {
                        break;
                    }
                }
                if queue.add_used(mem, head, written).is_err() {
                    break;
                }
                used = true;
            }
        }
        used
    }
}
