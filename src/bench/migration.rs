//! The `migration` scenario kind (`disco bench migration`): how fast the
//! mapper migrates pages, against this machine's memcpy bandwidth measured
//! in the same run, and what migration costs a running guest.
//!
//! Per repetition, interleaved so drift in the machine's load hits every
//! figure alike:
//!
//! 1. memcpy: copy `mib` MiB between two touched anonymous buffers, page by
//!    page; bandwidth as 4 KiB pages per second.
//! 2. batched migration: a guest space of `mib` MiB (every page written)
//!    moved to the other node's pool with one `Memory::move_pages` call, no
//!    guest running; with the call's own breakdown of where the time went.
//!    Every repetition builds a new `Memory`, so this move is always the
//!    **first touch** of the target pool (cold: the kernel allocates every
//!    target page); only the freeing side gains from warm pages (up to the
//!    cap, old pages are kept instead of punched).
//!
//!    Then warm targets (steady state, "part 2b"): after that move, a window
//!    of the space as large as the warm cap is moved back and forth between
//!    the pools, `1 + WARM_PASSES` times; every target is then a warm page
//!    (freed by the previous pass, still resident), as when the NUMA runner
//!    moves pages back and forth. Reported apart from the cold figure. The
//!    first pass is reported on its own: it is where the monitor's views
//!    of the pools first map the window's pages (about 1.8 us per page
//!    here, a one-time cost per pool page); the steady-state figure is the
//!    mean of the `WARM_PASSES` passes after it.
//! 3. single-page migration: the same, one `Memory::move_page` per frame
//!    (write-protect, copy, remap, free each page on its own).
//! 4. batch sizes: the same space moved in calls of each of `batch_pages`
//!    frames (the throughput plot).
//! 5. under a guest: a sweep micro-VM runs alone, then again while a thread
//!    moves its data pages back and forth in `move_pages` calls of
//!    `guest_batch` frames; the ratio of the two guest run times is the
//!    slowdown. The guest's checksum must match both times.
//!
//! Contents are checked after every idle move (each page carries its own
//! number) and `Memory::verify` runs after each, outside the timed part.
//!
//! Goal (issue 4): batched migration at >= 50 % of memcpy's page rate.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{markdown_table, progress_bar, HostInfo, Stats};
use crate::faults::FaultHandler;
use crate::guest::{layout, Workload};
use crate::memory::{Gfn, Memory, MoveTimes};
use crate::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement};
use crate::PAGE_SIZE;

/// Timed moves of the warm window per repetition (part 2b), after its
/// first move. Odd, so the window ends on node 1 with the rest.
const WARM_PASSES: usize = 7;

/// Frames per `move_pages` call when no other size is given.
pub const DEFAULT_BATCH_SIZES: &[u64] = &[1, 8, 64, 512, 4096];
/// Frames per `move_pages` call of the mover under a running guest.
pub const DEFAULT_GUEST_BATCH: u64 = 64;

#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub mib: u64,
    pub reps: usize,
    /// Sweep passes of the guest in part 5.
    pub passes: u32,
    /// Pages per second the mover moves under the guest in part 5 (0: as
    /// fast as it can).
    pub guest_move_rate: u64,
    pub progress: bool,
}

/// Default pace of the mover under the guest: the most the shipped disco
/// policy moves, `copy_budget_pages` (512) per 100 ms epoch. Flat out, the
/// mover holds the memory lock nearly all the time and the guest, whose
/// writes to pages being moved wait for that lock, all but stops (measured
/// x1101 with warm target pages): a starvation figure, not what a policy
/// run does.
pub const DEFAULT_GUEST_MOVE_RATE: u64 = 5120;

impl MigrationOptions {
    pub fn standard(quick: bool) -> MigrationOptions {
        MigrationOptions {
            mib: if quick { 16 } else { 64 },
            reps: if quick { 3 } else { 5 },
            passes: if quick { 300 } else { 1000 },
            guest_move_rate: DEFAULT_GUEST_MOVE_RATE,
            progress: false,
        }
    }
}

/// Where one page's migration time goes in a batched move, ns per page
/// (medians over the repetitions).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Breakdown {
    pub protect: f64,
    pub alloc: f64,
    pub copy: f64,
    pub map: f64,
    pub free: f64,
    /// Everything else in the call (locking, sorting, the report).
    pub rest: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationResult {
    pub host: HostInfo,
    pub mib: u64,
    /// memcpy, pages (4 KiB) per second.
    pub memcpy_pages_per_s: Stats,
    /// `Memory::move_pages` of the whole space in one call, no guest
    /// running, pages per second.
    pub migrate_pages_per_s: Stats,
    /// `Memory::move_page` frame by frame, no guest running, pages per second.
    pub single_pages_per_s: Stats,
    /// Batched rate / memcpy rate, per repetition.
    pub ratio: Stats,
    /// Frames of the warm window (part 2b): min(space, warm cap).
    pub warm_window_pages: u64,
    /// `move_pages` of the warm window into warm target pages (steady
    /// state), pages per second.
    pub warm_pages_per_s: Stats,
    /// Warm rate / memcpy rate, per repetition.
    pub warm_ratio: Stats,
    /// The warm window's first move (untimed in `warm_pages_per_s`): warm
    /// targets, but neither pool view maps the pages yet. Pages per second.
    pub warm_first_pages_per_s: Stats,
    /// Share of the warm window's targets that really were warm pages.
    pub warm_hit_share: Stats,
    /// The kernel alone copying `mib` MiB from one memfd into a fresh one
    /// (`copy_file_range`, no disco code): the floor under a move into a
    /// cold pool, whose every target page the kernel must allocate.
    pub kernel_fresh_pages_per_s: Stats,
    /// That floor / memcpy.
    pub kernel_fresh_ratio: Stats,
    /// Median batched rate / median memcpy rate.
    pub ratio_to_memcpy: f64,
    /// Batched migration, ns per page by phase.
    pub breakdown: Breakdown,
    /// Pieces (one remap each) of the batched move, per repetition.
    pub pieces: Stats,
    /// `(frames per call, pages/s)` for each batch size.
    pub by_batch: Vec<(u64, Stats)>,
    /// Frames per `move_pages` call under the guest.
    pub guest_batch: u64,
    /// Pages per second the mover aimed at under the guest (0: flat out).
    #[serde(default)]
    pub guest_move_rate: u64,
    /// Guest run alone and while its pages move, ms.
    pub guest_alone_ms: Stats,
    pub guest_migrating_ms: Stats,
    /// Pages moved per second while the guest ran.
    pub migrate_under_guest_pages_per_s: Stats,
    /// Guest run time while migrating / alone, per repetition.
    pub slowdown: Stats,
    /// Median guest run time while migrating / alone.
    pub guest_slowdown: f64,
    /// Guest time lost per page moved under it, us: (run while migrating -
    /// run alone) / pages moved during the run, per repetition.
    pub guest_us_per_moved_page: Stats,
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

/// Pages/s of the kernel copying `mib` MiB from a filled memfd into a new,
/// empty one with `copy_file_range`: page cache to page cache, every
/// target page allocated on the way, as in a move into a cold pool but
/// with no disco code at all.
fn kernel_fresh_copy_rate(mib: u64) -> Result<f64> {
    let len = (mib as usize) << 20;
    let memfd = |name: &str| -> Result<OwnedFd> {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        ensure!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0,
            "ftruncate: {}",
            std::io::Error::last_os_error()
        );
        Ok(fd)
    };
    let (src, dst) = (memfd("disco-bench-src")?, memfd("disco-bench-dst")?);
    let page = vec![0x5au8; PAGE_SIZE];
    for i in 0..len / PAGE_SIZE {
        // SAFETY: writing a buffer we own into our memfd.
        let n = unsafe {
            libc::pwrite(
                src.as_raw_fd(),
                page.as_ptr() as *const libc::c_void,
                PAGE_SIZE,
                (i * PAGE_SIZE) as libc::off_t,
            )
        };
        ensure!(n == PAGE_SIZE as isize, "filling the source memfd");
    }
    let (mut off_in, mut off_out, mut left) = (0i64, 0i64, len);
    let t = Instant::now();
    while left > 0 {
        // SAFETY: two memfds we own, offsets inside both.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        ensure!(
            r > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= r as usize;
    }
    Ok((len / PAGE_SIZE) as f64 / t.elapsed().as_secs_f64())
}

/// A guest space of `frames` pages on node 0 of a two-pool memory, each
/// page filled with its own frame number.
fn filled_space(frames: u64) -> Result<(Memory, u32, usize)> {
    let cap = (frames + 64) as u32;
    let memory = Memory::new(&[(0, 0, cap), (1, 0, cap)])?;
    let (vm, base) = memory.create_space("migrate-bench", frames, 0)?;
    for gfn in 0..frames as usize {
        // SAFETY: writing the guest space just created (read-write mapping).
        let page = unsafe {
            std::slice::from_raw_parts_mut((base + gfn * PAGE_SIZE) as *mut u64, PAGE_SIZE / 8)
        };
        page.fill(gfn as u64 ^ 0xd15c_0000_0000_0000);
    }
    Ok((memory, vm, base))
}

/// Every frame still holds its number and sits on `node`; invariants hold.
fn check_moved(memory: &Memory, vm: u32, base: usize, frames: u64, node: usize) -> Result<()> {
    for gfn in 0..frames as usize {
        // SAFETY: reading the guest space (mapped, no guest running).
        let page = unsafe {
            std::slice::from_raw_parts((base + gfn * PAGE_SIZE) as *const u64, PAGE_SIZE / 8)
        };
        let want = gfn as u64 ^ 0xd15c_0000_0000_0000;
        ensure!(
            page.iter().all(|&w| w == want),
            "frame {gfn:#x} lost its content in migration"
        );
    }
    let stats = memory.space_stats(vm)?;
    ensure!(
        stats.pages_per_node[node] == frames,
        "not every frame reached node {node}: {:?}",
        stats.pages_per_node
    );
    memory.verify()
}

/// Moves a filled space to node 1 in `move_pages` calls of `batch` frames.
/// Returns pages/s, the summed breakdown and the pieces remapped.
fn batched_rate(mib: u64, batch: u64) -> Result<(f64, MoveTimes, u64, f64)> {
    let frames = mib * 256;
    let (memory, vm, base) = filled_space(frames)?;
    let gfns: Vec<Gfn> = (0..frames).collect();
    let mut times = MoveTimes::default();
    let mut pieces = 0;
    let t = Instant::now();
    for chunk in gfns.chunks(batch as usize) {
        let r = memory.move_pages(vm, chunk, 1)?;
        if let Some((gfn, why)) = r.failed.first() {
            bail!("frame {gfn:#x} did not migrate: {why}");
        }
        pieces += r.runs;
        let m = &r.times;
        times.protect_ns += m.protect_ns;
        times.alloc_ns += m.alloc_ns;
        times.copy_ns += m.copy_ns;
        times.map_ns += m.map_ns;
        times.free_ns += m.free_ns;
        times.shared_ns += m.shared_ns;
    }
    let secs = t.elapsed().as_secs_f64();
    check_moved(&memory, vm, base, frames, 1)?;
    memory.destroy_space(vm)?;
    Ok((frames as f64 / secs, times, pieces, secs * 1e9))
}

/// What part 2b measured.
struct WarmRun {
    /// Frames of the window.
    window: u64,
    /// Pages/s of the first move of the window.
    first: f64,
    /// Pages/s of the `WARM_PASSES` moves after it (steady state).
    steady: f64,
    /// Share of the steady moves' targets that were warm pages.
    hit: f64,
}

/// Part 2b: moves the whole filled space to node 1 (untimed), then a
/// window of `min(frames, warm cap)` frames back and forth, each pass one
/// `move_pages` call whose targets are the pages the previous pass freed
/// (warm). The first pass is timed apart: the pool views map its pages for
/// the first time.
fn warm_rate(mib: u64) -> Result<WarmRun> {
    let frames = mib * 256;
    let (memory, vm, base) = filled_space(frames)?;
    let gfns: Vec<Gfn> = (0..frames).collect();
    let r = memory.move_pages(vm, &gfns, 1)?;
    ensure!(
        r.failed.is_empty(),
        "cold move failed: {:?}",
        r.failed.first()
    );
    let cap = memory.pool_stats()[0].warm_cap_pages as u64;
    let window: Vec<Gfn> = (0..frames.min(cap)).collect();
    let reused = || -> u64 {
        memory
            .pool_stats()
            .iter()
            .map(|p| p.warm_reused_pages)
            .sum()
    };
    // A guest would have used its pages since the last move (the NUMA
    // runner moves hot pages): each pass first reads them, untimed, so the
    // timed move finds them mapped in the guest's page table and pays for
    // unmapping them, as a real move does.
    let pass = |to: usize| -> Result<f64> {
        touch_pages(base, &window);
        let t = Instant::now();
        let r = memory.move_pages(vm, &window, to)?;
        let secs = t.elapsed().as_secs_f64();
        if let Some((gfn, why)) = r.failed.first() {
            bail!("frame {gfn:#x} did not migrate: {why}");
        }
        Ok(secs)
    };
    let first = window.len() as f64 / pass(0)?;
    let reused_before = reused();
    let mut secs = 0.0;
    for p in 1..=WARM_PASSES {
        secs += pass(p % 2)?;
    }
    let moved = (window.len() * WARM_PASSES) as f64;
    let hit = (reused() - reused_before) as f64 / moved;
    // WARM_PASSES is odd: the window is back on node 1 with the rest.
    check_moved(&memory, vm, base, frames, 1)?;
    memory.destroy_space(vm)?;
    Ok(WarmRun {
        window: window.len() as u64,
        first,
        steady: moved / secs,
        hit,
    })
}

/// Reads one word of each frame through the guest mapping at `base`.
fn touch_pages(base: usize, gfns: &[Gfn]) {
    for &gfn in gfns {
        // SAFETY: a mapped frame of the bench's guest space.
        unsafe { std::ptr::read_volatile((base + gfn as usize * PAGE_SIZE) as *const u64) };
    }
}

fn single_rate(mib: u64) -> Result<f64> {
    let frames = mib * 256;
    let (memory, vm, base) = filled_space(frames)?;
    let t = Instant::now();
    for gfn in 0..frames {
        memory.move_page(vm, gfn, 1)?;
    }
    let secs = t.elapsed().as_secs_f64();
    check_moved(&memory, vm, base, frames, 1)?;
    memory.destroy_space(vm)?;
    Ok(frames as f64 / secs)
}

/// Runs a sweep guest; with `batch`, a thread moves its data pages between
/// two pools meanwhile, `batch` frames per `move_pages` call. Returns
/// (guest run ms, pages moved per s, pages moved).
fn guest_run(
    kvm: &kvm_ioctls::Kvm,
    passes: u32,
    seed: u64,
    batch: Option<u64>,
    move_rate: u64,
) -> Result<(f64, f64, u64)> {
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
        workload: Workload::Sweep { seed, passes },
        time_limit: Duration::from_secs(600),
    };
    let ram = GuestRam {
        host_addr: base,
        size: FRAMES as usize * PAGE_SIZE,
    };
    let mut guest = MicroVm::create(kvm, spec, ram)?;
    memory.set_pauser(vm, guest.pauser())?;
    let done = Arc::new(AtomicBool::new(false));
    let mover = batch.map(|batch| {
        let (memory, done) = (memory.clone(), done.clone());
        std::thread::spawn(move || -> Result<(u64, f64)> {
            let first = layout::DATA_ADDR / layout::PAGE;
            let (mut moved, mut gfn) = (0u64, first);
            let t = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let end = (gfn + batch).min(FRAMES);
                let gfns: Vec<Gfn> = (gfn..end).collect();
                let node = memory.lookup(vm, gfn)?.context("mapped")?.page.node();
                let r = memory.move_pages(vm, &gfns, 1 - node)?;
                if let Some((g, why)) = r.failed.first() {
                    bail!("frame {g:#x} did not migrate under the guest: {why}");
                }
                moved += r.moved.len() as u64;
                gfn = if end >= FRAMES { first } else { end };
                if move_rate > 0 {
                    // Keep to the pace: ahead of it, wait.
                    let due = Duration::from_secs_f64(moved as f64 / move_rate as f64);
                    let now = t.elapsed();
                    if due > now {
                        std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    }
                }
            }
            Ok((moved, t.elapsed().as_secs_f64()))
        })
    });
    guest.start()?;
    let out = guest.wait();
    done.store(true, Ordering::Relaxed);
    let (rate, moved) = match mover {
        Some(h) => {
            let (moved, secs) = h.join().map_err(|_| anyhow::anyhow!("mover panicked"))??;
            (moved as f64 / secs, moved)
        }
        None => (0.0, 0),
    };
    if !out.checksum_ok() {
        bail!(
            "the guest's checksum is wrong (migrating = {}): {out:?}",
            batch.is_some()
        );
    }
    memory.verify()?;
    memory.destroy_space(vm)?;
    Ok((out.run_time.as_secs_f64() * 1e3, rate, moved))
}

/// Runs the measurement with the standard batch sizes.
pub fn run(o: &MigrationOptions) -> Result<MigrationResult> {
    run_with(o, DEFAULT_BATCH_SIZES, DEFAULT_GUEST_BATCH, 5)
}

/// Runs the measurement: `batch_sizes` for the throughput-by-batch plot,
/// `guest_batch` frames per call under the guest, `seed` the guest's
/// workload seed.
pub fn run_with(
    o: &MigrationOptions,
    batch_sizes: &[u64],
    guest_batch: u64,
    seed: u64,
) -> Result<MigrationResult> {
    ensure!(
        o.reps > 0,
        "the migration scenario needs at least one repetition"
    );
    let kvm = kvm_ioctls::Kvm::new().context("cannot open /dev/kvm")?;
    let bar = progress_bar(o.reps as u64, o.progress);
    let (mut memcpy, mut batched, mut single) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratio, mut pieces) = (Vec::new(), Vec::new());
    let (mut warm, mut warm_ratio, mut warm_hit, mut warm_window) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut warm_first = Vec::new();
    let (mut fresh, mut fresh_ratio) = (Vec::new(), Vec::new());
    let mut phases: Vec<[f64; 6]> = Vec::new();
    let mut by_batch: Vec<Vec<f64>> = vec![Vec::new(); batch_sizes.len()];
    let (mut alone, mut moving, mut under, mut slowdown) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut lost = Vec::new();
    let frames = o.mib * 256;
    for _ in 0..o.reps {
        let copy = memcpy_rate(o.mib);
        memcpy.push(copy);
        let (rate, t, p, total_ns) = batched_rate(o.mib, frames)?;
        batched.push(rate);
        ratio.push(rate / copy);
        pieces.push(p as f64);
        let per = |ns: u64| ns as f64 / frames as f64;
        let known = t.protect_ns + t.alloc_ns + t.copy_ns + t.map_ns + t.free_ns + t.shared_ns;
        phases.push([
            per(t.protect_ns),
            per(t.alloc_ns),
            per(t.copy_ns),
            per(t.map_ns),
            per(t.free_ns),
            (total_ns - known as f64).max(0.0) / frames as f64,
        ]);
        let floor = kernel_fresh_copy_rate(o.mib)?;
        fresh.push(floor);
        fresh_ratio.push(floor / copy);
        let w = warm_rate(o.mib)?;
        warm_window = w.window;
        warm.push(w.steady);
        warm_ratio.push(w.steady / copy);
        warm_hit.push(w.hit);
        warm_first.push(w.first);
        single.push(single_rate(o.mib)?);
        for (i, &b) in batch_sizes.iter().enumerate() {
            by_batch[i].push(batched_rate(o.mib, b)?.0);
        }
        let (a, _, _) = guest_run(&kvm, o.passes, seed, None, 0)?;
        let (m, rate, pages) =
            guest_run(&kvm, o.passes, seed, Some(guest_batch), o.guest_move_rate)?;
        lost.push((m - a) * 1e3 / pages.max(1) as f64);
        alone.push(a);
        moving.push(m);
        under.push(rate);
        slowdown.push(m / a);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let phase = |i: usize| Stats::of(&phases.iter().map(|p| p[i]).collect::<Vec<_>>()).median;
    let (memcpy, batched) = (Stats::of(&memcpy), Stats::of(&batched));
    let (alone, moving) = (Stats::of(&alone), Stats::of(&moving));
    Ok(MigrationResult {
        host: HostInfo::detect(),
        mib: o.mib,
        ratio_to_memcpy: batched.median / memcpy.median,
        guest_slowdown: moving.median / alone.median,
        breakdown: Breakdown {
            protect: phase(0),
            alloc: phase(1),
            copy: phase(2),
            map: phase(3),
            free: phase(4),
            rest: phase(5),
        },
        pieces: Stats::of(&pieces),
        by_batch: batch_sizes
            .iter()
            .zip(by_batch)
            .map(|(&b, r)| (b, Stats::of(&r)))
            .collect(),
        guest_batch,
        guest_move_rate: o.guest_move_rate,
        memcpy_pages_per_s: memcpy,
        migrate_pages_per_s: batched,
        single_pages_per_s: Stats::of(&single),
        ratio: Stats::of(&ratio),
        warm_window_pages: warm_window,
        warm_pages_per_s: Stats::of(&warm),
        warm_ratio: Stats::of(&warm_ratio),
        warm_first_pages_per_s: Stats::of(&warm_first),
        warm_hit_share: Stats::of(&warm_hit),
        kernel_fresh_pages_per_s: Stats::of(&fresh),
        kernel_fresh_ratio: Stats::of(&fresh_ratio),
        guest_alone_ms: alone,
        guest_migrating_ms: moving,
        migrate_under_guest_pages_per_s: Stats::of(&under),
        slowdown: Stats::of(&slowdown),
        guest_us_per_moved_page: Stats::of(&lost),
    })
}

impl MigrationResult {
    pub fn render_table(&self) -> String {
        let b = &self.breakdown;
        let mut rows = vec![
            vec!["memcpy (pages/s)".into(), self.memcpy_pages_per_s.show(0)],
            vec![
                "move_pages, whole space in one call, no guest, cold target pool (pages/s)".into(),
                self.migrate_pages_per_s.show(0),
            ],
            vec![
                "move_page, one frame per call, no guest (pages/s)".into(),
                self.single_pages_per_s.show(0),
            ],
            vec![
                "batched, first touch of the target pool (cold) / memcpy".into(),
                self.ratio.show(3),
            ],
            vec![
                "kernel alone: copy_file_range into a fresh memfd (pages/s)".into(),
                self.kernel_fresh_pages_per_s.show(0),
            ],
            vec![
                "kernel alone, into fresh pages / memcpy (the floor under cold)".into(),
                self.kernel_fresh_ratio.show(3),
            ],
            vec![
                format!(
                    "move_pages of a {}-page window into warm target pages, steady state (pages/s)",
                    self.warm_window_pages
                ),
                self.warm_pages_per_s.show(0),
            ],
            vec![
                "batched (warm targets) / memcpy (goal >= 0.5, steady state)".into(),
                self.warm_ratio.show(3),
            ],
            vec![
                "its first move, pool views not mapping the pages yet (pages/s)".into(),
                self.warm_first_pages_per_s.show(0),
            ],
            vec![
                "share of the warm window's targets that were warm pages".into(),
                self.warm_hit_share.show(3),
            ],
            vec![
                "remaps (pieces) of the batched move".into(),
                self.pieces.show(0),
            ],
            vec![
                "batched, ns per page: protect / alloc / copy / map / free / rest".into(),
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0}",
                    b.protect, b.alloc, b.copy, b.map, b.free, b.rest
                ),
            ],
        ];
        for (size, s) in &self.by_batch {
            rows.push(vec![
                format!("move_pages, {size} frames per call (pages/s)"),
                s.show(0),
            ]);
        }
        rows.extend([
            vec![
                format!(
                    "move_pages ({} frames per call) under a running guest, paced at {} (pages/s)",
                    self.guest_batch,
                    match self.guest_move_rate {
                        0 => "no limit".to_string(),
                        r => format!("{r} pages/s"),
                    }
                ),
                self.migrate_under_guest_pages_per_s.show(0),
            ],
            vec!["guest run alone (ms)".into(), self.guest_alone_ms.show(1)],
            vec![
                "guest run while its pages move (ms)".into(),
                self.guest_migrating_ms.show(1),
            ],
            vec!["guest slowdown".into(), self.slowdown.show(2)],
            vec![
                "guest time lost per page moved under it (us)".into(),
                self.guest_us_per_moved_page.show(1),
            ],
        ]);
        format!(
            "migration: {} MiB, median (min-max) of {} interleaved repetitions\n\n{}\n{}\n",
            self.mib,
            self.memcpy_pages_per_s.n,
            markdown_table(&["figure", "value"], &rows),
            self.host.describe()
        )
    }
}

// ---------------------------------------------------------------------------
// the suite's view (`disco bench`, benches/scenarios/migration.toml)
// ---------------------------------------------------------------------------

struct MigrationScenario {
    options: MigrationOptions,
    batch_pages: Vec<u64>,
    guest_batch: u64,
}

/// Reads a `kind = "migration"` scenario file: `mib` (the idle space),
/// `reps`, `passes` (of the guest), `batch_pages` (frames per call for the
/// plot), `guest_batch` (frames per call under the guest).
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let mib = p.u64("mib", 1, 4096, if quick { 8 } else { 64 })?;
    let batch_pages = p.u64_list("batch_pages", 1, 1 << 20, DEFAULT_BATCH_SIZES)?;
    Ok(Box::new(MigrationScenario {
        options: MigrationOptions {
            mib,
            reps: p.usize("reps", 1, 1000, if quick { 2 } else { 5 })?,
            passes: p.u64("passes", 1, 1_000_000, if quick { 50 } else { 300 })? as u32,
            guest_move_rate: p.u64("guest_move_rate", 0, 100_000_000, DEFAULT_GUEST_MOVE_RATE)?,
            progress: false,
        },
        batch_pages,
        guest_batch: p.u64("guest_batch", 1, 1 << 20, DEFAULT_GUEST_BATCH)?,
    }))
}

impl Scenario for MigrationScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let mut options = self.options.clone();
        options.progress = progress.show;
        Ok(Box::new(run_with(
            &options,
            &self.batch_pages,
            self.guest_batch,
            seed,
        )?))
    }
}

impl ScenarioResult for MigrationResult {
    fn figures(&self) -> Vec<Figure> {
        let b = &self.breakdown;
        let mut out = vec![
            Figure::new(
                "batched migration / memcpy",
                "ratio",
                Better::Higher,
                self.ratio.clone(),
            )
            .headline(),
            Figure::new(
                "memcpy",
                "pages/s",
                Better::Neither,
                self.memcpy_pages_per_s.clone(),
            ),
            Figure::new(
                "batched migration (move_pages)",
                "pages/s",
                Better::Higher,
                self.migrate_pages_per_s.clone(),
            )
            .headline(),
            Figure::new(
                "batched migration into warm targets (steady state)",
                "pages/s",
                Better::Higher,
                self.warm_pages_per_s.clone(),
            ),
            Figure::new(
                "batched migration into warm targets / memcpy",
                "ratio",
                Better::Higher,
                self.warm_ratio.clone(),
            )
            .headline(),
            Figure::new(
                "first move into warm targets (pool views not mapped yet)",
                "pages/s",
                Better::Higher,
                self.warm_first_pages_per_s.clone(),
            ),
            Figure::new(
                "kernel copy into fresh shmem pages (copy_file_range)",
                "pages/s",
                Better::Neither,
                self.kernel_fresh_pages_per_s.clone(),
            ),
            Figure::new(
                "kernel copy into fresh shmem pages / memcpy",
                "ratio",
                Better::Neither,
                self.kernel_fresh_ratio.clone(),
            ),
            Figure::new(
                "warm share of the warm window's targets",
                "ratio",
                Better::Neither,
                self.warm_hit_share.clone(),
            ),
            Figure::new(
                "single-page migration (move_page)",
                "pages/s",
                Better::Higher,
                self.single_pages_per_s.clone(),
            ),
            Figure::new(
                // Set by the pace (guest_move_rate), so a reference figure.
                "batched migration under a running guest",
                "pages/s",
                Better::Neither,
                self.migrate_under_guest_pages_per_s.clone(),
            ),
            Figure::new(
                "guest slowdown while its pages move",
                "ratio",
                Better::Lower,
                self.slowdown.clone(),
            )
            .headline(),
            Figure::new(
                "guest time lost per page moved under it",
                "us",
                Better::Lower,
                self.guest_us_per_moved_page.clone(),
            ),
        ];
        for (phase, v) in [
            ("protect", b.protect),
            ("alloc", b.alloc),
            ("copy", b.copy),
            ("map", b.map),
            ("free", b.free),
            ("rest", b.rest),
        ] {
            out.push(Figure::value(
                &format!("batched migration time per page: {phase}"),
                "ns",
                Better::Lower,
                v,
            ));
        }
        for (size, s) in &self.by_batch {
            out.push(Figure::new(
                &format!("move_pages, {size} frames per call"),
                "pages/s",
                Better::Higher,
                s.clone(),
            ));
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let points: Vec<(f64, f64)> = self
            .by_batch
            .iter()
            .map(|(size, s)| ((*size as f64).log2(), s.median))
            .collect();
        let svg = LinePlot::new(
            "Migration throughput against memcpy bandwidth",
            "frames per move_pages call (log2)",
            "pages per second",
        )
        .series("move_pages (cold target pool)", points)
        .reference_line(self.memcpy_pages_per_s.median, "memcpy")
        .reference_line(
            self.warm_pages_per_s.median,
            "move_pages into warm targets, steady state",
        )
        .reference_line(self.memcpy_pages_per_s.median / 2.0, "goal: memcpy / 2")
        .reference_line(
            self.kernel_fresh_pages_per_s.median,
            "kernel copy into fresh pages",
        )
        .reference_line(self.single_pages_per_s.median, "move_page")
        .render();
        vec![Plot {
            name: "throughput".into(),
            title: "migration throughput against memcpy bandwidth".into(),
            svg,
        }]
    }

    fn markdown(&self) -> String {
        self.render_table()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
