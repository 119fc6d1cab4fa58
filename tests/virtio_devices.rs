//! virtio-mmio block and console at the device level: a small driver in
//! this test programs the transport's registers the way Linux's
//! virtio_mmio driver does (status handshake, feature negotiation, queue
//! setup), writes real split-queue descriptors and rings into guest RAM
//! taken from the monitor's pools, notifies, and checks the used ring, the
//! interrupt (an eventfd, as KVM's irqfd would see it) and the data that
//! went through the device to a file and back, and that a device's saved
//! state (as a snapshot keeps it) lets a fresh device go on. No KVM needed.

use std::path::PathBuf;

use disco::linux::block::{self, Block};
use disco::linux::console::{Console, RX_QUEUE, TX_QUEUE};
use disco::linux::mmio::{reg, VirtioDevice, VirtioMmio, F_VERSION_1, MAGIC_VALUE};
use disco::linux::mmio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use disco::linux::serial::ConsoleSink;
use disco::linux::SerialOutput;
use disco::memory::Memory;
use disco::vm::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const QSIZE: u16 = 16;

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("disco-virtio-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Guest RAM from the monitor's pools (1 node, 4 MiB), as a Linux VM gets it.
struct Ram {
    memory: Memory,
    space: disco::memory::VmId,
    mem: GuestMemoryMmap,
}

impl Ram {
    fn new() -> Ram {
        let memory = Memory::new(&[(0, 0, 4096)]).unwrap();
        let frames = 1024;
        let (space, base) = memory.create_space("virtio-test", frames, 0).unwrap();
        let ram = GuestRam {
            host_addr: base,
            size: frames as usize * 4096,
        };
        let mem = disco::linux::loader::guest_memory(&ram).unwrap();
        Ram { memory, space, mem }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        self.memory.destroy_space(self.space).unwrap();
    }
}

/// A test driver for one virtio-mmio device.
struct Driver {
    dev: VirtioMmio,
    irq: EventFd,
    mem: GuestMemoryMmap,
    /// Per queue: (desc table, avail ring, used ring) addresses, next avail
    /// index, next free descriptor, last seen used index.
    queues: Vec<(u64, u64, u64, u16, u16, u16)>,
}

impl Driver {
    fn new(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> Driver {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = VirtioMmio::new(device, mem.clone(), irq.try_clone().unwrap());
        Driver {
            dev,
            irq,
            mem: mem.clone(),
            queues: Vec::new(),
        }
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.dev.write(offset, &v.to_le_bytes());
    }

    /// The virtio 1.x initialisation sequence; returns the device features.
    fn init(&mut self, want: u64, queues: usize) -> u64 {
        assert_eq!(self.r32(reg::MAGIC), MAGIC_VALUE);
        assert_eq!(self.r32(reg::VERSION), 2);
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, STATUS_ACKNOWLEDGE);
        self.w32(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES) as u64;
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let features = lo | (self.r32(reg::DEVICE_FEATURES) as u64) << 32;
        assert!(
            features & F_VERSION_1 != 0,
            "a modern device offers VERSION_1"
        );
        let accept = (want | F_VERSION_1) & features;
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, accept as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (accept >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w32(reg::STATUS, s);
        assert_eq!(
            self.r32(reg::STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        for q in 0..queues {
            let base = 0x10_0000 + q as u64 * 0x4000;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            self.w32(reg::QUEUE_SEL, q as u32);
            assert!(self.r32(reg::QUEUE_NUM_MAX) >= QSIZE as u32);
            self.w32(reg::QUEUE_NUM, QSIZE as u32);
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, desc),
                (reg::QUEUE_AVAIL_LOW, avail),
                (reg::QUEUE_USED_LOW, used),
            ] {
                self.w32(lo, addr as u32);
                self.w32(lo + 4, (addr >> 32) as u32);
            }
            self.w32(reg::QUEUE_READY, 1);
            assert_eq!(self.r32(reg::QUEUE_READY), 1);
            self.queues.push((desc, avail, used, 0, 0, 0));
        }
        self.w32(reg::STATUS, s | STATUS_DRIVER_OK);
        features
    }

    /// Puts a chain of `(addr, len, device-writable)` buffers on queue `q`
    /// and notifies; returns (head id, used length) from the used ring.
    fn submit(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> (u32, u32) {
        let (desc, avail, _, next_avail, next_desc, last_used) = self.queues[q];
        let head = next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (next_desc + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let mut flags = if write { DESC_WRITE } else { 0 };
            if !last {
                flags |= DESC_NEXT;
            }
            let d = desc + idx as u64 * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj((idx + 1) % QSIZE, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = avail + 4 + (next_avail % QSIZE) as u64 * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        let new_avail = next_avail.wrapping_add(1);
        self.mem
            .write_obj(new_avail, GuestAddress(avail + 2))
            .unwrap();
        self.queues[q].3 = new_avail;
        self.queues[q].4 = (next_desc + bufs.len() as u16) % QSIZE;
        let before = self.irq.read().unwrap_or(0);
        assert_eq!(before, 0, "no interrupt pending before the notify");
        self.w32(reg::QUEUE_NOTIFY, q as u32);
        self.take_used(q, last_used)
    }

    /// Waits for nothing: the device works synchronously on notify. Checks
    /// the used index moved by one, the interrupt fired and is acked.
    fn take_used(&mut self, q: usize, last_used: u16) -> (u32, u32) {
        let used = self.queues[q].2;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(idx, last_used.wrapping_add(1), "one more used buffer");
        let e = used + 4 + (last_used % QSIZE) as u64 * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
        self.queues[q].5 = idx;
        assert_eq!(
            self.irq.read().unwrap(),
            1,
            "the used buffer raised the interrupt"
        );
        assert_eq!(self.r32(reg::INTERRUPT_STATUS) & 1, 1);
        self.w32(reg::INTERRUPT_ACK, 1);
        assert_eq!(self.r32(reg::INTERRUPT_STATUS), 0);
        (id, len)
    }
}

/// A block request: header, data buffers, status; returns (status, used len).
fn block_request(
    d: &mut Driver,
    kind: u32,
    sector: u64,
    data: &[(u64, u32)],
    device_writes: bool,
) -> (u8, u32) {
    let hdr = 0x1000u64;
    let status = 0x2000u64;
    d.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    d.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(data.iter().map(|&(a, l)| (a, l, device_writes)));
    bufs.push((status, 1, true));
    let (_, len) = d.submit(0, &bufs);
    (d.mem.read_obj(GuestAddress(status)).unwrap(), len)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn block_writes_reach_the_file_and_reads_come_back() {
    let ram = Ram::new();
    let path = temp_path("rw.img");
    let original = pattern(7, 64 * 1024);
    std::fs::write(&path, &original).unwrap();
    let mut d = Driver::new(Box::new(Block::open(&path, false).unwrap()), &ram.mem);
    let features = d.init(block::F_FLUSH, 1);
    assert_eq!(features & block::F_RO, 0, "a writable disk is not RO");
    let mut cap = [0u8; 8];
    d.dev.read(reg::CONFIG, &mut cap);
    assert_eq!(
        u64::from_le_bytes(cap),
        64 * 1024 / 512,
        "capacity in sectors"
    );

    // Write 1 KiB (two descriptors) at sector 3.
    let data = pattern(99, 1024);
    ram.mem.write_slice(&data, GuestAddress(0x3000)).unwrap();
    let (status, _) = block_request(
        &mut d,
        block::T_OUT,
        3,
        &[(0x3000, 512), (0x3200, 512)],
        false,
    );
    assert_eq!(status, block::S_OK);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(
        &file[3 * 512..3 * 512 + 1024],
        &data[..],
        "the write reached the file"
    );
    assert_eq!(
        &file[..3 * 512],
        &original[..3 * 512],
        "nothing else changed"
    );

    // Read 8 sectors from 0 back into other guest pages.
    let (status, len) = block_request(&mut d, block::T_IN, 0, &[(0x8000, 4096)], true);
    assert_eq!(status, block::S_OK);
    assert_eq!(len, 4096 + 1, "data plus the status byte");
    let mut back = vec![0u8; 4096];
    ram.mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(
        &back[..],
        &file[..4096],
        "the read returns the file's bytes"
    );

    assert_eq!(
        block_request(&mut d, block::T_FLUSH, 0, &[], false).0,
        block::S_OK
    );
    let (status, len) = block_request(&mut d, block::T_GET_ID, 0, &[(0x9000, 20)], true);
    assert_eq!(status, block::S_OK);
    let mut id = vec![0u8; 6];
    ram.mem.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
    assert_eq!(&id, b"rw.img");
    assert_eq!(len, 20 + 1);

    // Past the end of the disk: an I/O error, nothing read.
    let (status, _) = block_request(&mut d, block::T_IN, 127, &[(0x8000, 1024)], true);
    assert_eq!(status, block::S_IOERR);
    assert_eq!(
        block_request(&mut d, 77, 0, &[], false).0,
        block::S_UNSUPP,
        "unknown request type"
    );
}

#[test]
fn read_only_block_refuses_writes() {
    let ram = Ram::new();
    let path = temp_path("ro.img");
    let original = pattern(3, 8 * 512);
    std::fs::write(&path, &original).unwrap();
    let mut d = Driver::new(Box::new(Block::open(&path, true).unwrap()), &ram.mem);
    let features = d.init(block::F_RO, 1);
    assert_ne!(features & block::F_RO, 0, "a read-only disk says so");
    ram.mem
        .write_slice(&pattern(200, 512), GuestAddress(0x3000))
        .unwrap();
    let (status, _) = block_request(&mut d, block::T_OUT, 0, &[(0x3000, 512)], false);
    assert_eq!(status, block::S_IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), original, "file unchanged");
    let (status, _) = block_request(&mut d, block::T_IN, 1, &[(0x8000, 512)], true);
    assert_eq!(status, block::S_OK);
    let mut back = vec![0u8; 512];
    ram.mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(&back[..], &original[512..1024]);
}

#[test]
fn console_output_reaches_the_file_and_input_reaches_the_guest() {
    let ram = Ram::new();
    let out = temp_path("console.txt");
    let sink = ConsoleSink::new("vm", &SerialOutput::File(out.clone())).unwrap();
    let console = Console::new(sink.clone());
    let input = console.input();
    let mut d = Driver::new(Box::new(console), &ram.mem);
    d.init(0, 2);

    let text = b"hello from the guest over virtio\n";
    ram.mem.write_slice(text, GuestAddress(0x3000)).unwrap();
    let (_, len) = d.submit(
        TX_QUEUE,
        &[(0x3000, 10, false), (0x300a, text.len() as u32 - 10, false)],
    );
    assert_eq!(len, 0, "transmit buffers are only read");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        text,
        "output went to the file"
    );
    assert_eq!(sink.captured(), text);

    // Input: the host queues bytes, the guest has posted a receive buffer.
    input.lock().extend(b"typed".iter());
    let (desc, avail, _, next_avail, next_desc, last_used) = d.queues[RX_QUEUE];
    let dd = desc + next_desc as u64 * 16;
    d.mem.write_obj(0x5000u64, GuestAddress(dd)).unwrap();
    d.mem.write_obj(64u32, GuestAddress(dd + 8)).unwrap();
    d.mem.write_obj(DESC_WRITE, GuestAddress(dd + 12)).unwrap();
    d.mem
        .write_obj(
            next_desc,
            GuestAddress(avail + 4 + (next_avail % QSIZE) as u64 * 2),
        )
        .unwrap();
    d.mem
        .write_obj(next_avail + 1, GuestAddress(avail + 2))
        .unwrap();
    d.queues[RX_QUEUE].3 += 1;
    d.dev.host_notify(RX_QUEUE);
    let (id, len) = d.take_used(RX_QUEUE, last_used);
    assert_eq!((id, len), (next_desc as u32, 5));
    let mut got = [0u8; 5];
    ram.mem.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
    assert_eq!(&got, b"typed");
    assert!(input.lock().is_empty());
}

#[test]
fn a_legacy_driver_is_refused() {
    let ram = Ram::new();
    let sink = ConsoleSink::new("vm", &SerialOutput::None).unwrap();
    let mut d = Driver::new(Box::new(Console::new(sink)), &ram.mem);
    d.w32(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.w32(reg::DRIVER_FEATURES_SEL, 1);
    d.w32(reg::DRIVER_FEATURES, 0); // no VERSION_1
    d.w32(
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(d.r32(reg::STATUS) & STATUS_FEATURES_OK, 0);
}

#[test]
fn a_block_device_goes_on_from_its_saved_state_in_a_fresh_device() {
    let ram = Ram::new();
    let path = temp_path("state.img");
    let original = pattern(11, 64 * 1024);
    std::fs::write(&path, &original).unwrap();
    let mut d = Driver::new(Box::new(Block::open(&path, true).unwrap()), &ram.mem);
    d.init(0, 1);
    for sector in 0..3u64 {
        let (status, _) = block_request(&mut d, block::T_IN, sector * 8, &[(0x8000, 4096)], true);
        assert_eq!(status, block::S_OK);
    }
    // The state as a snapshot keeps it (JSON), into a fresh device on the
    // same guest memory, as a restore builds it.
    let state = d.dev.state();
    assert_eq!(state.queues[0].next_avail, 3);
    assert_eq!(state.queues[0].next_used, 3);
    let json = serde_json::to_string(&state).unwrap();
    let mut fresh = Driver::new(Box::new(Block::open(&path, true).unwrap()), &ram.mem);
    fresh
        .dev
        .set_state(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(fresh.dev.state(), state);
    assert_eq!(
        fresh.r32(reg::STATUS) & STATUS_DRIVER_OK,
        STATUS_DRIVER_OK,
        "the driver's handshake is carried over"
    );
    fresh.queues = d.queues.clone();
    // The fourth request lands in the used ring's fourth slot.
    let (status, len) = block_request(&mut fresh, block::T_IN, 24, &[(0x8000, 4096)], true);
    assert_eq!((status, len), (block::S_OK, 4096 + 1));
    let mut back = vec![0u8; 4096];
    ram.mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(&back[..], &original[24 * 512..24 * 512 + 4096]);

    // A state saved from another kind of device is refused.
    let sink = ConsoleSink::new("t", &SerialOutput::None).unwrap();
    let mut console = VirtioMmio::new(
        Box::new(Console::new(sink)),
        ram.mem.clone(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let e = console.set_state(&state).unwrap_err();
    assert!(e.contains("type 2 saved where this VM has type 3"), "{e}");
}

#[test]
fn console_input_not_yet_read_is_carried_in_the_saved_state() {
    let ram = Ram::new();
    let sink = ConsoleSink::new("t", &SerialOutput::None).unwrap();
    let console = Console::new(sink.clone());
    console.input().lock().extend(b"pending");
    let d = Driver::new(Box::new(console), &ram.mem);
    let state = d.dev.state();
    assert_eq!(state.device, b"pending");
    let fresh_console = Console::new(sink);
    let input = fresh_console.input();
    let mut fresh = Driver::new(Box::new(fresh_console), &ram.mem);
    fresh.dev.set_state(&state).unwrap();
    assert_eq!(
        input.lock().iter().copied().collect::<Vec<u8>>(),
        b"pending"
    );
}
