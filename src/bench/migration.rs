//! `disco bench migration`: how fast the mapper migrates pages, against
//! this machine's memcpy bandwidth measured in the same run, and what
//! migration costs a running guest.
//!
//! 1. memcpy: copy a buffer of `mib` MiB between two touched anonymous
//!    buffers; bandwidth as 4 KiB pages per second.
//! 2. idle migration: a guest space of `mib` MiB (every page written) moved
//!    page by page between two node pools with `Memory::move_page`
//!    (write-protect, copy, remap, free), no guest running.
//! 3. under a guest: a sweep micro-VM runs alone, then again while a thread
//!    migrates its data pages back and forth; the ratio of the two guest
//!    run times is the slowdown, and the pages moved per second under load
//!    are reported. The guest's checksum must match both times.
//!
//! Goal (issue 4): idle migration at >= 50 % of memcpy's page rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{markdown_table, progress_bar, HostInfo, Stats};
use crate::faults::FaultHandler;
use crate::guest::{layout, Workload};
use crate::memory::Memory;
use crate::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement};
use crate::PAGE_SIZE;

#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub mib: u64,
    pub reps: usize,
    /// Sweep passes of the guest in part 3.
    pub passes: u32,
    pub progress: bool,
}

impl MigrationOptions {
    pub fn standard(quick: bool) -> MigrationOptions {
        MigrationOptions {
            mib: if quick { 16 } else { 64 },
            reps: if quick { 3 } else { 5 },
            passes: if quick { 300 } else { 1000 },
            progress: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationResult {
    pub host: HostInfo,
    pub mib: u64,
    /// memcpy, pages (4 KiB) per second.
    pub memcpy_pages_per_s: Stats,
    /// `Memory::move_page` with no guest running, pages per second.
    pub migrate_pages_per_s: Stats,
    /// Median migration rate / median memcpy rate.
    pub ratio_to_memcpy: f64,
    /// Guest run alone and while its pages move, ms.
    pub guest_alone_ms: Stats,
    pub guest_migrating_ms: Stats,
    /// Pages moved per second while the guest ran.
    pub migrate_under_guest_pages_per_s: Stats,
    /// Median guest run time while migrating / alone.
    pub guest_slowdown: f64,
}

fn memcpy_rate(mib: u64) -> f64 {
    let len = (mib as usize) << 20;
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // touch both
    let t = Instant::now();
    for (d, s) in dst.chunks_mut(PAGE_SIZE).zip(src.chunks(PAGE_SIZE)) {
        d.copy_from_slice(s);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    (len / PAGE_SIZE) as f64 / secs
}

fn idle_migration_rate(mib: u64) -> Result<f64> {
    let frames = mib * 256;
    let cap = (frames + 64) as u32;
    let memory = Memory::new(&[(0, 0, cap), (1, 0, cap)])?;
    let (vm, base) = memory.create_space("migrate-bench", frames, 0)?;
    // SAFETY: writing the guest space just created (read-write mapping).
    unsafe { std::ptr::write_bytes(base as *mut u8, 0xa5, frames as usize * PAGE_SIZE) };
    let t = Instant::now();
    for gfn in 0..frames {
        memory.move_page(vm, gfn, 1)?;
    }
    let secs = t.elapsed().as_secs_f64();
    memory.verify()?;
    memory.destroy_space(vm)?;
    Ok(frames as f64 / secs)
}

/// Runs a sweep guest; with `migrate`, a thread moves its data pages
/// between two pools meanwhile. Returns (guest run ms, pages moved per s).
fn guest_run(kvm: &kvm_ioctls::Kvm, passes: u32, migrate: bool) -> Result<(f64, f64)> {
    const FRAMES: u64 = 2048;
    let memory = Arc::new(Memory::new(&[(0, 0, 8192), (1, 0, 8192)])?);
    let _handler = FaultHandler::start(memory.clone())?;
    let (vm, base) = memory.create_space("sweeper", FRAMES, 0)?;
    let spec = MicroVmSpec {
        name: "sweeper".into(),
        vcpus: vec![VcpuPlacement {
            node: 1,
            host_cpus: vec![],
        }],
        workload: Workload::Sweep { seed: 5, passes },
        time_limit: Duration::from_secs(600),
    };
    let ram = GuestRam {
        host_addr: base,
        size: FRAMES as usize * PAGE_SIZE,
    };
    let mut guest = MicroVm::create(kvm, spec, ram)?;
    memory.set_pauser(vm, guest.pauser())?;
    let done = Arc::new(AtomicBool::new(false));
    let mover = migrate.then(|| {
        let (memory, done) = (memory.clone(), done.clone());
        std::thread::spawn(move || -> Result<(u64, f64)> {
            let first = layout::DATA_ADDR / layout::PAGE;
            let (mut moved, mut gfn) = (0u64, first);
            let t = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let node = memory.lookup(vm, gfn)?.context("mapped")?.page.node();
                memory.move_page(vm, gfn, 1 - node)?;
                moved += 1;
                gfn = if gfn + 1 >= FRAMES { first } else { gfn + 1 };
            }
            Ok((moved, t.elapsed().as_secs_f64()))
        })
    });
    guest.start()?;
    let out = guest.wait();
    done.store(true, Ordering::Relaxed);
    let rate = match mover {
        Some(h) => {
            let (moved, secs) = h.join().map_err(|_| anyhow::anyhow!("mover panicked"))??;
            moved as f64 / secs
        }
        None => 0.0,
    };
    if !out.checksum_ok() {
        bail!("the guest's checksum is wrong (migrate = {migrate}): {out:?}");
    }
    memory.verify()?;
    memory.destroy_space(vm)?;
    Ok((out.run_time.as_secs_f64() * 1e3, rate))
}

pub fn run(o: &MigrationOptions) -> Result<MigrationResult> {
    let kvm = kvm_ioctls::Kvm::new().context("cannot open /dev/kvm")?;
    let bar = progress_bar(o.reps as u64, o.progress);
    let (mut memcpy, mut migrate) = (Vec::new(), Vec::new());
    let (mut alone, mut moving, mut under) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so drift in the machine's load hits every figure alike.
    for _ in 0..o.reps {
        memcpy.push(memcpy_rate(o.mib));
        migrate.push(idle_migration_rate(o.mib)?);
        alone.push(guest_run(&kvm, o.passes, false)?.0);
        let (ms, rate) = guest_run(&kvm, o.passes, true)?;
        moving.push(ms);
        under.push(rate);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (memcpy, migrate) = (Stats::of(&memcpy), Stats::of(&migrate));
    let (alone, moving) = (Stats::of(&alone), Stats::of(&moving));
    Ok(MigrationResult {
        host: HostInfo::detect(),
        mib: o.mib,
        ratio_to_memcpy: migrate.median / memcpy.median,
        guest_slowdown: moving.median / alone.median,
        memcpy_pages_per_s: memcpy,
        migrate_pages_per_s: migrate,
        guest_alone_ms: alone,
        guest_migrating_ms: moving,
        migrate_under_guest_pages_per_s: Stats::of(&under),
    })
}

impl MigrationResult {
    pub fn render_table(&self) -> String {
        let rows = vec![
            vec!["memcpy (pages/s)".into(), self.memcpy_pages_per_s.show(0)],
            vec![
                "move_page, no guest (pages/s)".into(),
                self.migrate_pages_per_s.show(0),
            ],
            vec![
                "ratio to memcpy (goal >= 0.5)".into(),
                format!("{:.3}", self.ratio_to_memcpy),
            ],
            vec![
                "move_page under a running guest (pages/s)".into(),
                self.migrate_under_guest_pages_per_s.show(0),
            ],
            vec!["guest run alone (ms)".into(), self.guest_alone_ms.show(1)],
            vec![
                "guest run while its pages move (ms)".into(),
                self.guest_migrating_ms.show(1),
            ],
            vec![
                "guest slowdown".into(),
                format!("x{:.2}", self.guest_slowdown),
            ],
        ];
        format!(
            "migration: {} MiB, median (min-max) of {} interleaved runs\n\n{}\n{}\n",
            self.mib,
            self.memcpy_pages_per_s.n,
            markdown_table(&["figure", "value"], &rows),
            self.host.describe()
        )
    }
}
