//! The guest's console output: a 16550 UART at COM1 (vm-superio) whose
//! interrupt is an irqfd on IRQ 4, writing into a [`ConsoleSink`] shared
//! with the virtio console. The sink copies every byte into a bounded
//! in-memory capture (tests and reports read it) and to the VM's chosen
//! output: the monitor's stdout (each line prefixed with the VM's name), a
//! file, or nowhere.

use std::io::Write;
use std::sync::Arc;

use parking_lot::Mutex;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::SerialOutput;

/// COM1's I/O ports.
pub const COM1: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// Most bytes of console output kept in memory.
const CAPTURE_LIMIT: usize = 4 << 20;

enum Target {
    None,
    Stdout { prefix: String, line: Vec<u8> },
    File(std::fs::File),
}

struct SinkInner {
    target: Target,
    capture: Vec<u8>,
    dropped: u64,
}

/// Where a VM's console output goes (cheap to clone; clones share).
#[derive(Clone)]
pub struct ConsoleSink(Arc<Mutex<SinkInner>>);

impl ConsoleSink {
    /// A sink for VM `vm` writing to `output` (a file is created/truncated).
    pub fn new(vm: &str, output: &SerialOutput) -> anyhow::Result<ConsoleSink> {
        let target = match output {
            SerialOutput::None => Target::None,
            SerialOutput::Console => Target::Stdout {
                prefix: format!("{vm}| "),
                line: Vec::new(),
            },
            SerialOutput::File(p) => Target::File(std::fs::File::create(p).map_err(|e| {
                anyhow::anyhow!("creating serial output file {}: {e}", p.display())
            })?),
        };
        Ok(ConsoleSink(Arc::new(Mutex::new(SinkInner {
            target,
            capture: Vec::new(),
            dropped: 0,
        }))))
    }

    /// Appends guest output.
    pub fn put(&self, bytes: &[u8]) {
        let mut s = self.0.lock();
        let room = CAPTURE_LIMIT.saturating_sub(s.capture.len());
        let keep = bytes.len().min(room);
        s.capture.extend_from_slice(&bytes[..keep]);
        s.dropped += (bytes.len() - keep) as u64;
        match &mut s.target {
            Target::None => {}
            Target::File(f) => {
                let _ = f.write_all(bytes);
            }
            Target::Stdout { prefix, line } => {
                for &b in bytes {
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(line).replace('\r', "");
                        // Not println!: it panics when stdout is closed
                        // or full; the guest's console output is then lost
                        // (the capture above keeps it for the report).
                        let _ = writeln!(std::io::stdout().lock(), "{prefix}{text}");
                        line.clear();
                    } else {
                        line.push(b);
                    }
                }
            }
        }
    }

    /// Puts output a VM printed before a restore in the capture (not in
    /// the output: it went there before).
    pub fn preload(&self, bytes: &[u8]) {
        let mut s = self.0.lock();
        let keep = bytes.len().min(CAPTURE_LIMIT);
        s.capture.extend_from_slice(&bytes[bytes.len() - keep..]);
    }

    /// The last `max` bytes of the capture.
    pub fn tail(&self, max: usize) -> Vec<u8> {
        let s = self.0.lock();
        s.capture[s.capture.len().saturating_sub(max)..].to_vec()
    }

    /// Everything the guest printed so far (up to the capture limit).
    pub fn captured(&self) -> Vec<u8> {
        self.0.lock().capture.clone()
    }

    /// The captured output as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.captured()).into_owned()
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.put(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line: an eventfd registered as a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1.
pub type SerialPort = Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>;

/// A 16550 at COM1 writing to `sink`, interrupting through `irq`.
pub fn serial_port(irq: EventFd, sink: ConsoleSink) -> SerialPort {
    Serial::new(IrqLine(irq), sink)
}
