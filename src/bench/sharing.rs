//! The sharing scenario (`disco bench sharing`): disco's transparent page
//! sharing against Linux KSM, in one run, on the same guests.
//!
//! N VMs of M MiB each, a chosen percentage of whose data pages is identical
//! across VMs, are filled by real micro-guests. Then:
//!
//! * **disco**: a `Monitor` (host topology, a policy of sharing alone, its
//!   fault handler started) builds and starts one `Fill { seed,
//!   private_seed: per VM, shared_percent }` micro-VM per VM, as `disco run`
//!   would. After the guests finished, the monitor's services start: its
//!   scanner at `pages_per_second` (policy swaps stop and start it later;
//!   a rewrite is `Monitor::rerun`, a second guest on a VM's space); `sharing_stats()` and
//!   the scanner's stats are sampled every `sample_interval` until the saved
//!   pages reach the steady state predicted from the content (every mergeable
//!   frame read through `Memory::read_guest_page` and grouped by content:
//!   each group of k frames saves k - 1 machine pages, and every all-zero
//!   frame saves its page, which is released to the host). Reported: time and monitor CPU (scanner thread + fault
//!   handler thread, from the kernel's per-thread accounting) to 90 % and
//!   100 %, the series, bytes saved, host memory freed.
//! * **copy-on-write breaks**: at steady state (scanner stopped) a guest
//!   rewrites one VM's whole memory with another seed; the fault handler's
//!   time per break (median, p99) comes from `sharing_stats()`; the guest's
//!   run time is compared with the same guest on a private, never-shared
//!   copy of that VM (interleaved), giving the guest-visible cost per break.
//! * **guest slowdown while scanning**: a `Sweep` guest's run time with the
//!   scanner running at its rate (over the N VMs and the sweep VM itself)
//!   and without, interleaved repetitions. The scanner has finished one pass
//!   over the (merged) VMs when the sweep VM is created, so the guest runs
//!   under steady operation; the default sweep (400 passes) outlasts a full
//!   scanner pass, so the scanner also hashes the guest's own pages while it
//!   writes them.
//! * **KSM**: [`crate::bench::ksm::run_ksm_side`] with the same N, M,
//!   fraction and seeds, at `KsmSetting::FASTEST`, with its sweep slowdown
//!   measurement; it restores KSM's settings afterwards (guard).
//!
//! The two sides' guests are not byte-identical: KSM's side gives each VM's
//! region to two `Fill` micro-VMs (shared part, unique part, see the ksm
//! module), disco's side runs one micro-VM per VM with `shared_percent`
//! (shared pages interleaved). Each side's prediction is computed from its
//! own memory, and each side is judged against its own prediction; the
//! predictions are reported side by side. disco's prediction also counts
//! the never-touched (all-zero) frames of each VM, which KSM never sees (they
//! are not resident in anonymous memory); see `host_freed_bytes` for the
//! host memory actually given back.
//!
//! While the disco side runs, the KSM lock is held (when KSM is available),
//! so no KSM measurement of another process runs meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::ksm::{
    run_ksm_side, vm_seed, FillMode, Ksm, KsmBenchConfig, KsmEvent, KsmResult, KsmSetting,
    Sample as KsmSample, SlowdownConfig,
};
use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{markdown_table_aligned, HostInfo, Stats};
use crate::config::{Policy, VmConfig};
use crate::guest::{layout, Workload};
use crate::memory::cow::page_hash;
use crate::memory::{Gfn, Memory, SharingStats, VmId};
use crate::monitor::Monitor;
use crate::report::VmReport;
use crate::sharing::ScannerStats;
use crate::vm::GuestRam;
use crate::PAGE_SIZE;

const MIB: f64 = (1u64 << 20) as f64;

/// The sweep guest of the slowdown measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepOptions {
    pub mib: u64,
    pub passes: u32,
    /// Runs with the scanner off and with it on (interleaved).
    pub reps: usize,
}

/// What to measure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharingOptions {
    pub vms: usize,
    pub mib_per_vm: u64,
    /// Percentage of each VM's data pages identical across VMs (0 to 100).
    pub shared_percent: u8,
    /// disco's side: frames per block of the shared/private choice (1:
    /// shared pages scattered among private ones frame by frame, the worst
    /// case; larger: runs, as VMs booted from one image hold them).
    #[serde(default = "one")]
    pub shared_run: u32,
    /// disco's scanner rate.
    pub pages_per_second: u64,
    /// Content seed common to all VMs; VM `i`'s private pages use
    /// `ksm::vm_seed(seed, i)` (on both sides).
    pub seed: u64,
    /// VMs rewritten through copy-on-write (each against a private twin).
    pub cow_reps: usize,
    pub sweep: SweepOptions,
    /// Sampling period of both sides.
    pub sample_interval: Duration,
    /// disco: give up waiting for the steady state after this long.
    pub timeout: Duration,
    /// KSM: how long ksmd runs. On the build hosts KSM stops a few pages
    /// short of the prediction (see [`Comparison`]), so it always runs this
    /// long; its steady state is then the plateau it reached.
    pub ksm_timeout: Duration,
    pub ksm_setting: KsmSetting,
    /// Phase lines on stderr.
    #[serde(skip)]
    pub progress: bool,
}

impl SharingOptions {
    /// `disco bench sharing`: 8 VMs of 32 MiB, 50 % identical, scanner at
    /// the policy's default 100 000 pages/s, 3 copy-on-write rewrites, 5
    /// sweep repetitions. `quick` (about 30 s): 4 VMs of 16 MiB, fewer
    /// repetitions.
    pub fn standard(quick: bool) -> SharingOptions {
        let base = SharingOptions {
            vms: 8,
            mib_per_vm: 32,
            shared_percent: 50,
            shared_run: 1,
            pages_per_second: 100_000,
            seed: KsmBenchConfig::default().seed,
            cow_reps: 3,
            sweep: SweepOptions {
                mib: 32,
                passes: 400,
                reps: 5,
            },
            sample_interval: Duration::from_millis(20),
            timeout: Duration::from_secs(120),
            ksm_timeout: Duration::from_secs(15),
            ksm_setting: KsmSetting::FASTEST,
            progress: false,
        };
        if quick {
            SharingOptions {
                vms: 4,
                mib_per_vm: 16,
                cow_reps: 2,
                sweep: SweepOptions {
                    mib: 16,
                    passes: 400,
                    reps: 3,
                },
                timeout: Duration::from_secs(60),
                ksm_timeout: Duration::from_secs(8),
                ..base
            }
        } else {
            base
        }
    }

    /// A tiny configuration for tests: 3 VMs of 4 MiB.
    pub fn tiny() -> SharingOptions {
        SharingOptions {
            vms: 3,
            mib_per_vm: 4,
            cow_reps: 1,
            sweep: SweepOptions {
                mib: 4,
                passes: 5,
                reps: 2,
            },
            timeout: Duration::from_secs(60),
            ksm_timeout: Duration::from_secs(5),
            ..SharingOptions::standard(true)
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.vms >= 2, "the sharing scenario needs at least 2 VMs");
        ensure!(self.shared_percent <= 100, "shared_percent is 0 to 100");
        ensure!(
            self.pages_per_second > 0,
            "pages_per_second must be positive"
        );
        ensure!(
            self.cow_reps >= 1 && self.sweep.reps >= 1,
            "at least one copy-on-write rewrite and one sweep repetition"
        );
        ensure!(
            !self.sample_interval.is_zero(),
            "sample_interval must be positive"
        );
        let min = layout::min_ram_bytes(&self.fill_workload(0), 1);
        ensure!(
            self.mib_per_vm << 20 >= min && self.sweep.mib << 20 >= min,
            "a VM needs at least {min} bytes of RAM"
        );
        self.ksm_config().validate()
    }

    /// The fill of VM `vm`.
    pub fn fill_workload(&self, vm: usize) -> Workload {
        Workload::Fill {
            seed: self.seed,
            private_seed: vm_seed(self.seed, vm),
            shared_percent: self.shared_percent,
            shared_run: self.shared_run,
        }
    }

    /// The guest that rewrites VM `vm`'s memory in the copy-on-write phase
    /// (content unique to that VM, so nothing merges again afterwards).
    fn rewrite_workload(&self, vm: usize) -> Workload {
        let seed = vm_seed(self.seed.rotate_left(17) ^ 0xC0FF_EE00_0000_0001, vm);
        Workload::Fill {
            seed,
            private_seed: seed,
            shared_percent: 100,
            shared_run: 1,
        }
    }

    fn sweep_workload(&self) -> Workload {
        Workload::Sweep {
            seed: self.seed ^ 0x51_0e_d0_e5,
            passes: self.sweep.passes,
        }
    }

    fn frames_per_vm(&self) -> u64 {
        self.mib_per_vm * (1 << 20) / PAGE_SIZE as u64
    }

    /// The KSM side's configuration: same N, M, fraction and seed.
    pub fn ksm_config(&self) -> KsmBenchConfig {
        KsmBenchConfig {
            vms: self.vms,
            mib_per_vm: self.mib_per_vm as usize,
            shared_fraction: self.shared_percent as f64 / 100.0,
            zero_fraction: 0.0,
            seed: self.seed,
            fill: FillMode::Guests,
            setting: self.ksm_setting,
            timeout: self.ksm_timeout,
            sample_interval: self.sample_interval,
            transparent_hugepages: false,
            slowdown: Some(SlowdownConfig {
                mib: self.sweep.mib as usize,
                passes: self.sweep.passes,
                runs: self.sweep.reps,
            }),
        }
    }
}

/// What the content of disco's guests predicts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoCensus {
    /// Frames of all VMs.
    pub frames: u64,
    /// Frames kept out of sharing (the micro-guests' code pages).
    pub excluded_frames: u64,
    /// All-zero mergeable frames (mostly never touched by the guest).
    pub zero_frames: u64,
    /// Distinct contents among mergeable frames (zero included).
    pub distinct_contents: u64,
    /// Non-zero contents held by two frames or more.
    pub duplicate_groups: u64,
    /// Machine pages sharing should save: frames minus distinct non-zero
    /// contents minus zero frames (their pages are released, not shared).
    pub expected_saved_pages: u64,
    /// Of those, from all-zero frames.
    pub expected_saved_zero_pages: u64,
}

/// One sample of disco's progress, relative to the scanner's start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoSample {
    pub t_ms: f64,
    pub saved_pages: u64,
    pub shared_machine_pages: u64,
    pub merges: u64,
    pub pages_scanned: u64,
    pub full_scans: u64,
    /// The scanner thread's CPU time.
    pub scanner_cpu_ms: f64,
    /// The fault handler thread's CPU time since the scanner started.
    pub handler_cpu_ms: f64,
}

/// The copy-on-write phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CowFigures {
    /// VMs rewritten (each also as a private twin).
    pub rewrites: usize,
    /// Breaks (private copies made) during the rewrite guests' runs.
    pub breaks_per_rewrite: Stats,
    /// Every break of the phase, including the host's writes while the
    /// rewrite micro-VMs were created.
    pub breaks: u64,
    /// Fault handler time per break (copy + remap + wake), from the mapper.
    pub handler_median_us: f64,
    pub handler_p99_us: f64,
    /// The fault handler thread's CPU over the phase, per break.
    pub handler_cpu_us_per_break: f64,
    /// Rewrite guest's run time on the shared VM, ms.
    pub shared_run_ms: Stats,
    /// The same guest on a private copy of that VM (never shared), ms.
    pub private_run_ms: Stats,
    /// (median shared - median private) / median breaks per rewrite, µs:
    /// what one break costs the guest (exit, fault message, handler, wake).
    pub guest_cost_per_break_us: f64,
    /// The handler time distribution of this phase's breaks: the 0th, 1st,
    /// ..., 100th percentile, µs (empty without breaks).
    #[serde(default)]
    pub handler_percentiles_us: Vec<f64>,
}

/// The sweep guest with the scanner off and on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoSlowdown {
    pub sweep: SweepOptions,
    pub scanner_off_ms: Stats,
    pub scanner_on_ms: Stats,
    /// Median on / median off.
    pub ratio: f64,
    /// Fastest on / fastest off (other load on the host only adds time, so
    /// the minima are the less noisy comparison on a shared host).
    pub ratio_min: f64,
    /// Merges and copy-on-write breaks during the scanner-on runs (the sweep
    /// VM's fresh pages merge onto the zero page before the guest writes
    /// them, then break).
    pub merges_during_on_runs: u64,
    pub breaks_during_on_runs: u64,
    /// Scanner CPU per scanner-on run (its first pass over the VMs before
    /// the sweep VM is created, then the guest's run), ms.
    pub scanner_cpu_ms: Stats,
    /// The scanner's CPU during the guest's run, in % of one CPU: what
    /// steady operation (re-hashing merged VMs at the configured rate)
    /// costs continuously.
    pub scanner_cpu_percent: Stats,
}

/// disco's side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoSide {
    pub pages_per_second: u64,
    /// All fill guests, created and run concurrently, ms.
    pub fill_ms: f64,
    pub census: DiscoCensus,
    pub series: Vec<DiscoSample>,
    pub time_to_90pct_ms: Option<f64>,
    pub time_to_steady_ms: Option<f64>,
    pub scanner_cpu_ms_to_90pct: Option<f64>,
    pub scanner_cpu_ms_to_steady: Option<f64>,
    /// Fault handler thread CPU from the scanner's start to steady state.
    pub handler_cpu_ms_to_steady: Option<f64>,
    /// Scanner + fault handler CPU to 90 % and to steady state.
    pub monitor_cpu_ms_to_90pct: Option<f64>,
    pub monitor_cpu_ms_to_steady: Option<f64>,
    pub full_scans_to_steady: Option<u64>,
    pub pages_scanned_to_steady: Option<u64>,
    pub reached_steady: bool,
    /// At the last sample.
    pub saved_bytes: u64,
    pub expected_saved_bytes: u64,
    /// Pool pages resident after the fill (before the census and the
    /// scanner) and at the last sample; their difference is the host memory
    /// sharing really gave back.
    pub resident_before_bytes: u64,
    pub resident_at_steady_bytes: u64,
    pub host_freed_bytes: i64,
    pub scanner: ScannerStats,
    /// Every mergeable frame still holds what the guests wrote (re-read).
    pub content_unchanged: bool,
    /// Every guest returned the model's checksum.
    pub guests_ok: bool,
    pub cow: CowFigures,
    pub slowdown: DiscoSlowdown,
    /// Where thread CPU times come from.
    pub cpu_source: String,
}

/// disco against KSM.
///
/// KSM's steady state: the first sample at which its savings reached the
/// prediction, or, when they never do, the first sample at which they
/// reached the value they then kept until the end of the run (at least
/// [`PLATEAU_HOLD`]). On the build hosts KSM merges everything but a few
/// pages (about one per micro-VM; `pages_volatile` stays at 1) and sits on
/// that plateau until `ksm_timeout`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// KSM's steady state as defined above, ms since ksmd started.
    pub ksm_steady_ms: Option<f64>,
    /// ksmd CPU until then.
    pub ksm_steady_cpu_ms: Option<f64>,
    /// The steady state is a plateau short of the prediction.
    pub ksm_steady_is_plateau: bool,
    /// Saved at that steady state.
    pub ksm_steady_saved_bytes: u64,
    /// KSM time / disco time, to 90 % and to steady state.
    pub time_ratio_90pct: Option<f64>,
    pub time_ratio_steady: Option<f64>,
    /// ksmd CPU / disco monitor CPU (scanner + fault handler).
    pub cpu_ratio_90pct: Option<f64>,
    pub cpu_ratio_steady: Option<f64>,
    /// Saved / predicted, each side.
    pub disco_saved_fraction: f64,
    pub ksm_saved_fraction: f64,
    /// The goals (issue 14): the same savings as KSM (of each one's
    /// prediction), in at most 1/`goal_time_ratio` of its time and
    /// 1/`goal_cpu_ratio` of its CPU: 1/3 and 1/5 where VMs hold shared
    /// content in runs, at most KSM's own on the scattered layout.
    #[serde(default)]
    pub goal_time_ratio: f64,
    #[serde(default)]
    pub goal_cpu_ratio: f64,
    pub goal_time_met: bool,
    pub goal_cpu_met: bool,
    pub goal_savings_met: bool,
}

/// The scenario's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharingResult {
    pub host: HostInfo,
    /// `/proc/loadavg` before and after the run (the host is shared: other
    /// load shows up in every figure).
    pub load_before: String,
    pub load_after: String,
    pub options: SharingOptions,
    pub disco: DiscoSide,
    pub ksm: KsmResult,
    pub comparison: Comparison,
}

// ---------------------------------------------------------------------------
// thread CPU from /proc
// ---------------------------------------------------------------------------

/// Thread ids of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.trim().starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// CPU time of thread `tid` of this process, ms: `schedstat` (ns) when the
/// kernel has it, else `stat` utime + stime (clock ticks).
fn thread_cpu_ms(tid: u32) -> Option<f64> {
    if let Some(on_cpu) = crate::vm::thread_on_cpu(tid) {
        return Some(on_cpu.as_secs_f64() * 1e3);
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let ticks = super::ksm::parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1000.0 / hz)
}

fn cpu_source() -> String {
    let schedstat = std::fs::read_to_string("/proc/self/schedstat").is_ok();
    if schedstat {
        "scanner: CLOCK_THREAD_CPUTIME_ID; fault handler: /proc/self/task/<tid>/schedstat; \
         ksmd: /proc/<ksmd>/schedstat"
            .into()
    } else {
        "scanner: CLOCK_THREAD_CPUTIME_ID; fault handler: /proc/self/task/<tid>/stat".into()
    }
}

/// Starts the monitor's fault handler and finds its thread (the one new
/// thread named `disco-cow-fault*`), whose CPU time the bench reads.
fn start_handler(monitor: &mut Monitor) -> Result<Option<u32>> {
    const NAME: &str = "disco-cow-fault";
    let before: HashSet<u32> = threads_named(NAME).into_iter().collect();
    monitor.start_fault_handler()?;
    // The thread names itself when it starts running.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let new: Vec<u32> = threads_named(NAME)
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect();
        if new.len() == 1 {
            return Ok(Some(new[0]));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------
// guests
// ---------------------------------------------------------------------------

/// The policy of disco's side: nothing but sharing, the scanner at the
/// options' rate and without the budget of kernel mappings, so that both
/// sides reach the savings their content predicts (on the scattered layout
/// the budget would stop disco short of them; what that costs in mappings
/// is the `scale` scenario's and `tests/merge_batch.rs`'s business). With
/// `scanning` off the scanner stops; copy-on-write goes on.
fn bench_policy(options: &SharingOptions, scanning: bool) -> Result<Policy> {
    let mut policy = crate::config::load_policy("static", Path::new("."))
        .map_err(|e| anyhow::anyhow!("the static policy: {e}"))?;
    policy.name = "bench-sharing".into();
    policy.sharing.enabled = scanning;
    policy.sharing.pages_per_second = options.pages_per_second;
    policy.sharing.frames_per_mapping = 0;
    Ok(policy)
}

/// A 1-vCPU micro-VM of `frames` frames on node 0 running `workload`, as
/// a `[[vm]]` table would give it.
fn vm_config(name: &str, frames: u64, workload: Workload) -> Result<VmConfig> {
    let text = format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {}\ntime_limit_s = 300\n",
        frames * PAGE_SIZE as u64 / (1 << 20)
    );
    let mut vc = super::config_from_toml(&text)?.vms.remove(0);
    vc.workload = workload;
    Ok(vc)
}

/// Adds VM `vc` to the monitor and starts it.
fn add(monitor: &mut Monitor, vc: &VmConfig) -> Result<()> {
    let i = monitor.create_vm(vc)?;
    monitor.start_vm(i).map_err(|e| anyhow::anyhow!(e))
}

/// Waits for VM `name`'s guest and checks its result against the model.
fn finished(monitor: &mut Monitor, name: &str) -> Result<VmReport> {
    let report = monitor.wait_vm(name)?;
    if report.status != "ok" {
        bail!(
            "guest {name} did not return the model's checksum: {} {:?}",
            report.error.as_deref().unwrap_or(""),
            report.vcpus
        );
    }
    Ok(report)
}

/// VM `name`'s guest space and its guest RAM.
fn space(monitor: &Monitor, name: &str) -> Result<(VmId, GuestRam)> {
    let (vm, base) = monitor
        .space_of(name)
        .with_context(|| format!("VM {name} has no guest space"))?;
    let frames = monitor
        .memory()
        .space_frames(vm)
        .with_context(|| format!("VM {name}'s guest space is gone"))?;
    Ok((
        vm,
        GuestRam {
            host_addr: base.with_context(|| format!("VM {name} is not a micro-VM"))?,
            size: frames as usize * PAGE_SIZE,
        },
    ))
}

// ---------------------------------------------------------------------------
// census
// ---------------------------------------------------------------------------

/// Per VM, per frame: `Some((zero, hash))`, `None` for excluded frames.
type FrameHashes = Vec<Vec<Option<(bool, u64)>>>;

fn hash_frames(memory: &Memory, spaces: &[(VmId, GuestRam)]) -> Result<FrameHashes> {
    let excluded = layout::system_frames();
    spaces
        .iter()
        .map(|(vm, ram)| {
            (0..(ram.size / PAGE_SIZE) as Gfn)
                .map(|gfn| {
                    if excluded.contains(&gfn) {
                        return Ok(None);
                    }
                    let page = memory.read_guest_page(*vm, gfn)?;
                    let zero = page.iter().all(|&b| b == 0);
                    Ok(Some((zero, if zero { 0 } else { page_hash(&page) })))
                })
                .collect()
        })
        .collect()
}

fn one() -> u32 {
    1
}

fn census(hashes: &FrameHashes) -> DiscoCensus {
    let mut groups: HashMap<(bool, u64), u64> = HashMap::new();
    let mut c = DiscoCensus::default();
    for frame in hashes.iter().flatten() {
        c.frames += 1;
        match frame {
            None => c.excluded_frames += 1,
            Some(key) => {
                c.zero_frames += key.0 as u64;
                *groups.entry(*key).or_default() += 1;
            }
        }
    }
    c.distinct_contents = groups.len() as u64;
    for (key, &k) in &groups {
        if key.0 {
            // Every zero frame's page is released to the host.
            c.expected_saved_pages += k;
            c.expected_saved_zero_pages += k;
        } else if k >= 2 {
            c.duplicate_groups += 1;
            c.expected_saved_pages += k - 1;
        }
    }
    c
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn resident(memory: &Memory) -> u64 {
    memory.pool_stats().iter().map(|p| p.resident_bytes).sum()
}

fn say(options: &SharingOptions, what: &str) {
    if options.progress {
        eprintln!("disco bench sharing: {what}");
    }
}

// ---------------------------------------------------------------------------
// disco side
// ---------------------------------------------------------------------------

/// The fault handler's thread, for its CPU time.
struct Handler {
    tid: Option<u32>,
}

impl Handler {
    fn cpu_ms(&self) -> f64 {
        self.tid.and_then(thread_cpu_ms).unwrap_or(0.0)
    }
}

/// What the merge phase measured.
struct MergePhase {
    series: Vec<DiscoSample>,
    t90: Option<usize>,
    steady: Option<usize>,
    scanner: ScannerStats,
}

/// The monitor's scanner starts (its services, under the bench policy)
/// and runs until the savings reach `target` or the timeout; then it stops.
fn merge_phase(
    monitor: &mut Monitor,
    handler: &Handler,
    options: &SharingOptions,
    target: u64,
) -> Result<MergePhase> {
    let memory = monitor.memory().clone();
    let handler0 = handler.cpu_ms();
    monitor
        .start_services(options.vms)
        .context("starting the scanner")?;
    let start = Instant::now();
    let sample = |t: Duration, stats: &SharingStats, scan: &ScannerStats| DiscoSample {
        t_ms: t.as_secs_f64() * 1e3,
        saved_pages: stats.pages_saved_in_all(),
        shared_machine_pages: stats.shared_machine_pages,
        merges: scan.merges,
        pages_scanned: scan.pages_scanned,
        full_scans: scan.full_scans,
        scanner_cpu_ms: scan.cpu_ms,
        handler_cpu_ms: handler.cpu_ms() - handler0,
    };
    let mut series = vec![DiscoSample {
        t_ms: 0.0,
        saved_pages: memory.sharing_stats().pages_saved_in_all(),
        shared_machine_pages: 0,
        merges: 0,
        pages_scanned: 0,
        full_scans: 0,
        scanner_cpu_ms: 0.0,
        handler_cpu_ms: 0.0,
    }];
    let (mut t90, mut steady) = (None, None);
    for tick in 1u32.. {
        let next = start + options.sample_interval * tick;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let t = start.elapsed();
        let stats = memory.sharing_stats();
        let s = sample(t, &stats, &monitor.scanner_stats().unwrap_or_default());
        let saved = s.saved_pages;
        series.push(s);
        if t90.is_none() && saved * 10 >= target * 9 {
            t90 = Some(series.len() - 1);
        }
        if saved >= target {
            steady = Some(series.len() - 1);
            break;
        }
        if t >= options.timeout {
            break;
        }
    }
    let scanner = monitor.scanner_stats().unwrap_or_default();
    monitor.set_policy(bench_policy(options, false)?)?;
    Ok(MergePhase {
        series,
        t90,
        steady,
        scanner,
    })
}

/// Rewrites of shared VMs against private twins.
fn cow_phase(
    monitor: &mut Monitor,
    handler: &Handler,
    options: &SharingOptions,
) -> Result<CowFigures> {
    let memory = monitor.memory().clone();
    let frames = options.frames_per_vm();
    let reps = options.cow_reps.min(options.vms);
    let breaks0 = memory.sharing_stats().cow_breaks;
    let times0 = memory.cow_break_histogram();
    let cpu0 = handler.cpu_ms();
    let (mut shared_ms, mut private_ms, mut breaks) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        // The private twin: the same fill, then the same rewrite, on a
        // VM the (stopped) scanner never merges.
        let twin = format!("twin{r}");
        add(
            monitor,
            &vm_config(&twin, frames, options.fill_workload(r))?,
        )?;
        let result = (|| -> Result<f64> {
            finished(monitor, &twin)?;
            monitor.rerun(&twin, options.rewrite_workload(r))?;
            Ok(finished(monitor, &twin)?.run_ms)
        })();
        monitor.remove(&twin)?;
        private_ms.push(result?);

        let name = format!("vm{r}");
        let before = memory.sharing_stats().cow_breaks;
        monitor.rerun(&name, options.rewrite_workload(r))?;
        let out = finished(monitor, &name)?;
        breaks.push((memory.sharing_stats().cow_breaks - before) as f64);
        shared_ms.push(out.run_ms);
    }
    let stats = memory.sharing_stats();
    let total = stats.cow_breaks - breaks0;
    let mut times = memory.cow_break_histogram();
    times
        .subtract(&times0)
        .context("break times of the rewrite phase")?;
    let handler_percentiles_us = if times.is_empty() {
        Vec::new()
    } else {
        (0..=100)
            .map(|p| crate::memory::cow::quantile_us(&times, p as f64 / 100.0))
            .collect()
    };
    let (shared_run_ms, private_run_ms) = (Stats::of(&shared_ms), Stats::of(&private_ms));
    let breaks_per_rewrite = Stats::of(&breaks);
    let guest_cost_per_break_us = if breaks_per_rewrite.median > 0.0 {
        (shared_run_ms.median - private_run_ms.median) * 1e3 / breaks_per_rewrite.median
    } else {
        0.0
    };
    Ok(CowFigures {
        rewrites: reps,
        breaks_per_rewrite,
        breaks: total,
        handler_median_us: stats.cow_break_median_us,
        handler_p99_us: stats.cow_break_p99_us,
        handler_cpu_us_per_break: if total > 0 {
            (handler.cpu_ms() - cpu0) * 1e3 / total as f64
        } else {
            0.0
        },
        shared_run_ms,
        private_run_ms,
        guest_cost_per_break_us,
        handler_percentiles_us,
    })
}

/// The sweep guest with the scanner off and on, interleaved.
fn slowdown_phase(monitor: &mut Monitor, options: &SharingOptions) -> Result<DiscoSlowdown> {
    let memory = monitor.memory().clone();
    let frames = options.sweep.mib * (1 << 20) / PAGE_SIZE as u64;
    let (mut off, mut on, mut cpu, mut shares) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut merges, mut breaks) = (0, 0);
    for rep in 0..options.sweep.reps {
        let order = if rep % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for scanning in order {
            let began = if scanning {
                monitor.set_policy(bench_policy(options, true)?)?;
                // Steady operation: the scanner is past its first pass over
                // the (already merged) VMs when the sweep VM appears.
                let deadline = Instant::now() + options.timeout;
                let scans = |m: &Monitor| m.scanner_stats().unwrap_or_default();
                while scans(monitor).full_scans < 1 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Some((scans(monitor).cpu_ms, Instant::now()))
            } else {
                None
            };
            let breaks0 = memory.sharing_stats().cow_breaks;
            let name = format!("sweep{rep}-{}", if scanning { "on" } else { "off" });
            add(
                monitor,
                &vm_config(&name, frames, options.sweep_workload())?,
            )?;
            let run = finished(monitor, &name).map(|r| r.run_ms);
            let stats = began.map(|(cpu0, t0)| {
                let s = monitor.scanner_stats().unwrap_or_default();
                let share = (s.cpu_ms - cpu0) / (t0.elapsed().as_secs_f64() * 1e3) * 100.0;
                (s, share)
            });
            if scanning {
                monitor.set_policy(bench_policy(options, false)?)?;
            }
            monitor.remove(&name)?;
            let ms = run?;
            match stats {
                Some((s, share)) => {
                    on.push(ms);
                    cpu.push(s.cpu_ms);
                    shares.push(share);
                    merges += s.merges;
                    breaks += memory.sharing_stats().cow_breaks - breaks0;
                }
                None => off.push(ms),
            }
        }
    }
    let (scanner_off_ms, scanner_on_ms) = (Stats::of(&off), Stats::of(&on));
    Ok(DiscoSlowdown {
        sweep: options.sweep,
        ratio: scanner_on_ms.median / scanner_off_ms.median,
        ratio_min: scanner_on_ms.min / scanner_off_ms.min,
        scanner_off_ms,
        scanner_on_ms,
        merges_during_on_runs: merges,
        breaks_during_on_runs: breaks,
        scanner_cpu_ms: Stats::of(&cpu),
        scanner_cpu_percent: Stats::of(&shares),
    })
}

/// disco's side of the scenario, on a [`Monitor`] (as `disco serve` would
/// run these VMs: no start-up of its own).
pub fn run_disco_side(options: &SharingOptions) -> Result<DiscoSide> {
    options.validate()?;
    let frames = options.frames_per_vm();
    let mut monitor = Monitor::new(
        crate::topology::Topology::host()?,
        bench_policy(options, true)?,
        "<bench sharing>",
        Duration::from_secs(3600),
    )?;
    ensure!(
        monitor.memory().userfault().is_some(),
        "page sharing needs userfaultfd (root or vm.unprivileged_userfaultfd=1)"
    );
    let handler = Handler {
        tid: start_handler(&mut monitor)?,
    };
    let side = disco_side_on(&mut monitor, &handler, options, frames);
    // Every VM collected, every guest space freed; the invariants checked
    // after that (every pool empty).
    let report = monitor.finish(Some(Duration::ZERO), &indicatif::ProgressBar::hidden(), 0.0)?;
    let side = side?;
    ensure!(
        report.verify_ok,
        "memory invariants at the end: {}",
        report.verify_errors.join("; ")
    );
    Ok(side)
}

fn disco_side_on(
    monitor: &mut Monitor,
    handler: &Handler,
    options: &SharingOptions,
    frames: u64,
) -> Result<DiscoSide> {
    let memory = monitor.memory().clone();
    say(options, "disco: filling the guests");
    let names: Vec<String> = (0..options.vms).map(|v| format!("vm{v}")).collect();
    let configs = names
        .iter()
        .enumerate()
        .map(|(v, name)| vm_config(name, frames, options.fill_workload(v)))
        .collect::<Result<Vec<_>>>()?;
    monitor.reserve_for(&configs)?;
    let mut built = Vec::with_capacity(configs.len());
    for vc in &configs {
        built.push(monitor.create_vm(vc)?);
    }
    let t_fill = Instant::now();
    for i in built {
        monitor.start_vm(i).map_err(|e| anyhow::anyhow!(e))?;
    }
    while !names.iter().all(|n| monitor.has_exited(n)) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let fill_ms = t_fill.elapsed().as_secs_f64() * 1e3;
    let resident_before_bytes = resident(&memory);
    let spaces = names
        .iter()
        .map(|n| space(monitor, n))
        .collect::<Result<Vec<_>>>()?;

    say(options, "disco: census of the guests' content");
    let before = hash_frames(&memory, &spaces)?;
    let census = census(&before);
    let target = census.expected_saved_pages;

    say(options, "disco: merging");
    let merge = merge_phase(monitor, handler, options, target)?;
    let resident_at_steady_bytes = resident(&memory);
    say(options, "disco: checking content and invariants");
    let content_unchanged = hash_frames(&memory, &spaces)? == before;
    memory
        .verify()
        .context("memory invariants at steady state")?;
    // The fill guests' KVM VMs stayed open (memory slots registered) while
    // pages were merged under them, as KSM's side keeps its guests.
    let mut guests_ok = true;
    for n in &names {
        guests_ok &= monitor.wait_vm(n)?.status == "ok";
    }

    say(options, "disco: copy-on-write breaks");
    let cow = cow_phase(monitor, handler, options)?;
    say(options, "disco: sweep guest with the scanner off and on");
    let slowdown = slowdown_phase(monitor, options)?;
    memory
        .verify()
        .context("memory invariants after the copy-on-write and sweep phases")?;

    let at = |i: Option<usize>| i.map(|i| &merge.series[i]);
    let last = merge.series.last().expect("a first sample");
    let side = DiscoSide {
        pages_per_second: options.pages_per_second,
        fill_ms,
        time_to_90pct_ms: at(merge.t90).map(|s| s.t_ms),
        time_to_steady_ms: at(merge.steady).map(|s| s.t_ms),
        scanner_cpu_ms_to_90pct: at(merge.t90).map(|s| s.scanner_cpu_ms),
        scanner_cpu_ms_to_steady: at(merge.steady).map(|s| s.scanner_cpu_ms),
        handler_cpu_ms_to_steady: at(merge.steady).map(|s| s.handler_cpu_ms),
        monitor_cpu_ms_to_90pct: at(merge.t90).map(|s| s.scanner_cpu_ms + s.handler_cpu_ms),
        monitor_cpu_ms_to_steady: at(merge.steady).map(|s| s.scanner_cpu_ms + s.handler_cpu_ms),
        full_scans_to_steady: at(merge.steady).map(|s| s.full_scans),
        pages_scanned_to_steady: at(merge.steady).map(|s| s.pages_scanned),
        reached_steady: merge.steady.is_some(),
        saved_bytes: last.saved_pages * PAGE_SIZE as u64,
        expected_saved_bytes: target * PAGE_SIZE as u64,
        resident_before_bytes,
        resident_at_steady_bytes,
        host_freed_bytes: resident_before_bytes as i64 - resident_at_steady_bytes as i64,
        scanner: merge.scanner.clone(),
        content_unchanged,
        guests_ok,
        cow,
        slowdown,
        cpu_source: cpu_source(),
        census,
        series: merge.series,
    };
    if !side.content_unchanged {
        bail!("a guest page's content changed while pages were merged");
    }
    if !side.guests_ok {
        bail!("a fill guest did not return the model's checksum");
    }
    Ok(side)
}

// ---------------------------------------------------------------------------
// the scenario
// ---------------------------------------------------------------------------

/// How long KSM's savings must stay unchanged until the end of the run for
/// their value to count as its steady state.
pub const PLATEAU_HOLD: Duration = Duration::from_secs(1);

/// KSM's steady-state sample, see [`Comparison`].
pub fn ksm_steady(ksm: &KsmResult) -> Option<&KsmSample> {
    if let Some(t) = ksm.time_to_steady_ms {
        return ksm.series.iter().find(|s| s.t_ms == t);
    }
    let last = ksm.series.last()?;
    let first = ksm
        .series
        .iter()
        .find(|s| s.saved_pages() >= last.saved_pages())?;
    let held = ksm
        .series
        .iter()
        .skip_while(|s| s.t_ms < first.t_ms)
        .all(|s| s.saved_pages() == last.saved_pages());
    (last.saved_pages() > 0 && held && last.t_ms - first.t_ms >= PLATEAU_HOLD.as_millis() as u64)
        .then_some(first)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Comparison {
    pub fn of(disco: &DiscoSide, ksm: &KsmResult, shared_run: u32) -> Comparison {
        let (goal_time_ratio, goal_cpu_ratio) = if shared_run > 1 {
            (3.0, 5.0)
        } else {
            (1.0, 1.0)
        };
        let fraction = |saved: u64, expected: u64| {
            if expected == 0 {
                1.0
            } else {
                saved as f64 / expected as f64
            }
        };
        let steady = ksm_steady(ksm);
        let ksm_steady_ms = steady.map(|s| s.t_ms as f64);
        let ksm_steady_cpu_ms = steady.map(|s| s.ksmd_cpu_ms);
        let time_ratio_steady = ratio(ksm_steady_ms, disco.time_to_steady_ms);
        let cpu_ratio_steady = ratio(ksm_steady_cpu_ms, disco.monitor_cpu_ms_to_steady);
        let disco_saved_fraction = fraction(disco.saved_bytes, disco.expected_saved_bytes);
        let ksm_saved_fraction = fraction(ksm.bytes_saved, ksm.expected_bytes_saved);
        Comparison {
            ksm_steady_ms,
            ksm_steady_cpu_ms,
            ksm_steady_is_plateau: steady.is_some() && ksm.time_to_steady_ms.is_none(),
            ksm_steady_saved_bytes: steady.map_or(0, |s| s.saved_pages() * PAGE_SIZE as u64),
            time_ratio_90pct: ratio(
                ksm.time_to_90pct_ms.map(|t| t as f64),
                disco.time_to_90pct_ms,
            ),
            time_ratio_steady,
            cpu_ratio_90pct: ratio(ksm.ksmd_cpu_ms_to_90pct, disco.monitor_cpu_ms_to_90pct),
            cpu_ratio_steady,
            disco_saved_fraction,
            ksm_saved_fraction,
            goal_time_ratio,
            goal_cpu_ratio,
            goal_time_met: time_ratio_steady.is_some_and(|r| r >= goal_time_ratio),
            goal_cpu_met: cpu_ratio_steady.is_some_and(|r| r >= goal_cpu_ratio),
            goal_savings_met: disco.reached_steady && disco_saved_fraction >= ksm_saved_fraction,
        }
    }
}

/// Runs disco's side, then KSM's (never both at once; KSM's settings are
/// restored before this returns).
pub fn run(options: &SharingOptions) -> Result<SharingResult> {
    options.validate()?;
    let load_before = load_average();
    let ksm_config = options.ksm_config();
    // Hold the KSM lock while disco measures, so no other process's KSM
    // measurement (ksmd at full speed) runs meanwhile. Released (settings
    // untouched, so restoring is a no-op apart from run=2) before KSM's side
    // takes it again.
    let disco = {
        let _lock = match Ksm::system().and_then(|k| k.guard()) {
            Ok(g) => Some(g),
            Err(e) => {
                say(options, &format!("KSM lock not taken: {e:#}"));
                None
            }
        };
        run_disco_side(options).context("disco's side of the sharing benchmark")?
    };
    say(
        options,
        "KSM: measuring (same guests on MADV_MERGEABLE anonymous memory)",
    );
    let progress = options.progress;
    let ksm = run_ksm_side(&ksm_config, |e| {
        if progress {
            if let KsmEvent::Phase(p) = e {
                eprintln!("disco bench sharing: KSM: {p}");
            }
        }
    })
    .context("KSM's side of the sharing benchmark")?;
    let comparison = Comparison::of(&disco, &ksm, options.shared_run);
    Ok(SharingResult {
        host: HostInfo::detect(),
        load_before,
        load_after: load_average(),
        options: options.clone(),
        disco,
        ksm,
        comparison,
    })
}

// ---------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / MIB)
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("not reached".into(), |v| format!("{v:.decimals$}"))
}

fn times(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}x"))
}

/// `series` (ms, value) up to `end_ms`, ending with a point at `end_ms`
/// holding the last value seen by then (disco's series ends at its steady
/// state; the savings stay).
fn clip(series: &[(f64, f64)], end_ms: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = series.iter().copied().filter(|p| p.0 <= end_ms).collect();
    if let Some(&(t, v)) = out.last() {
        if t < end_ms {
            out.push((end_ms, v));
        }
    }
    out
}

impl SharingResult {
    /// (ms, saved pages) of disco and of KSM.
    fn savings_series(&self) -> [Vec<(f64, f64)>; 2] {
        [
            self.disco
                .series
                .iter()
                .map(|s| (s.t_ms, s.saved_pages as f64))
                .collect(),
            self.ksm
                .series
                .iter()
                .map(|s| (s.t_ms as f64, s.saved_pages() as f64))
                .collect(),
        ]
    }

    /// Where plots and the series table stop: half as long again as the
    /// later side took to its steady state (KSM samples on after it).
    pub fn series_end_ms(&self) -> f64 {
        let [d, k] = self.savings_series();
        let last = |s: &[(f64, f64)]| s.last().map_or(0.0, |p| p.0);
        let d_end = self.disco.time_to_steady_ms.unwrap_or(last(&d));
        let k_end = self.comparison.ksm_steady_ms.unwrap_or(last(&k));
        let slack = 2.0 * self.options.sample_interval.as_secs_f64() * 1e3;
        (d_end.max(k_end) * 1.5 + slack).min(last(&d).max(last(&k)))
    }

    /// MiB saved over seconds, both sides.
    pub fn savings_plot(&self) -> LinePlot {
        let end = self.series_end_ms();
        let to_plot = |s: &[(f64, f64)]| -> Vec<(f64, f64)> {
            clip(s, end)
                .into_iter()
                .map(|(t, pages)| (t / 1e3, pages * PAGE_SIZE as f64 / MIB))
                .collect()
        };
        let [d, k] = self.savings_series();
        let (disco, ksm) = (to_plot(&d), to_plot(&k));
        let o = &self.options;
        let mut plot = LinePlot::new(
            &format!(
                "Savings over time: {} VMs x {} MiB, {} % identical",
                o.vms, o.mib_per_vm, o.shared_percent
            ),
            "seconds since the scanner / ksmd started",
            "MiB saved",
        )
        .series(
            &format!("disco (scanner {} pages/s)", o.pages_per_second),
            disco,
        )
        .series(
            &format!(
                "KSM (pages_to_scan={}, sleep_millisecs={})",
                self.ksm.setting.pages_to_scan, self.ksm.setting.sleep_millisecs
            ),
            ksm,
        );
        let (d, k) = (
            self.disco.expected_saved_bytes as f64 / MIB,
            self.ksm.expected_bytes_saved as f64 / MIB,
        );
        if (d - k).abs() < 0.05 {
            plot = plot.reference_line(d, "expected (both)");
        } else {
            plot = plot
                .reference_line(d, &format!("disco expected {d:.1} MiB"))
                .reference_line(k, &format!("KSM expected {k:.1} MiB"));
        }
        plot
    }

    /// Markdown: the comparison table, the savings series, notes.
    pub fn render_table(&self) -> String {
        let (o, d, k, c) = (&self.options, &self.disco, &self.ksm, &self.comparison);
        let mut out = format!(
            "{} VMs x {} MiB, {} % of data pages identical across VMs, filled by real micro-guests; \
             disco's scanner and Linux KSM on the same content, one after the other in one run\n\n",
            o.vms, o.mib_per_vm, o.shared_percent
        );
        let ksm_cpu = |v: Option<f64>| opt(v, 0);
        let ksm_ms = |v: Option<u64>| opt(v.map(|v| v as f64), 0);
        // KSM's steady state may be a plateau short of the prediction.
        let plateau_note = |v: String| {
            if c.ksm_steady_is_plateau {
                format!(
                    "{v} (plateau at {:.2} %)",
                    c.ksm_steady_saved_bytes as f64 * 100.0 / k.expected_bytes_saved.max(1) as f64
                )
            } else {
                v
            }
        };
        let ksm_slow = k.slowdown.as_ref();
        let rows: Vec<Vec<String>> = vec![
            vec![
                "setting".into(),
                format!(
                    "scanner {} pages/s, xxh3, pages merged (zero pages released) once seen unchanged on two passes",
                    d.pages_per_second
                ),
                format!(
                    "{} (max_page_sharing={})",
                    k.setting.describe(),
                    k.knobs_in_effect
                        .get("max_page_sharing")
                        .map_or("-", String::as_str)
                ),
                String::new(),
            ],
            vec![
                "expected saving (from the content), MiB".into(),
                format!(
                    "{} (of which all-zero frames {})",
                    mib(d.expected_saved_bytes as f64),
                    mib((d.census.expected_saved_zero_pages * PAGE_SIZE as u64) as f64)
                ),
                mib(k.expected_bytes_saved as f64),
                String::new(),
            ],
            vec![
                "saved at steady state, MiB (of expected)".into(),
                format!(
                    "{} ({:.1} %)",
                    mib(d.saved_bytes as f64),
                    c.disco_saved_fraction * 100.0
                ),
                format!(
                    "{} ({:.1} %)",
                    mib(k.bytes_saved as f64),
                    c.ksm_saved_fraction * 100.0
                ),
                String::new(),
            ],
            vec![
                "time to 90 % of expected, ms".into(),
                opt(d.time_to_90pct_ms, 0),
                ksm_ms(k.time_to_90pct_ms),
                times(c.time_ratio_90pct),
            ],
            vec![
                "time to steady state, ms".into(),
                opt(d.time_to_steady_ms, 0),
                plateau_note(opt(c.ksm_steady_ms, 0)),
                times(c.time_ratio_steady),
            ],
            vec![
                "CPU to 90 %, ms (disco: scanner + fault handler; KSM: ksmd)".into(),
                opt(d.monitor_cpu_ms_to_90pct, 0),
                ksm_cpu(k.ksmd_cpu_ms_to_90pct),
                times(c.cpu_ratio_90pct),
            ],
            vec![
                "CPU to steady state, ms".into(),
                format!(
                    "{} (scanner {}, handler {})",
                    opt(d.monitor_cpu_ms_to_steady, 0),
                    opt(d.scanner_cpu_ms_to_steady, 0),
                    opt(d.handler_cpu_ms_to_steady, 1)
                ),
                plateau_note(opt(c.ksm_steady_cpu_ms, 0)),
                times(c.cpu_ratio_steady),
            ],
            vec![
                "scan passes to steady state (disco: pages hashed / frames; KSM: full_scans)"
                    .into(),
                d.pages_scanned_to_steady.map_or("-".into(), |v| {
                    format!("{:.2}", v as f64 / d.census.frames.max(1) as f64)
                }),
                ksm_steady(k).map_or("-".into(), |s| s.full_scans.to_string()),
                String::new(),
            ],
            vec![
                "copy-on-write break, handler time median / p99, µs".into(),
                format!(
                    "{:.1} / {:.1}",
                    d.cow.handler_median_us, d.cow.handler_p99_us
                ),
                "- (in-kernel fault, not measured)".into(),
                String::new(),
            ],
            vec![
                "copy-on-write break, cost to the guest, µs per break".into(),
                format!(
                    "{:.1} (rewrite of a shared VM {} ms vs private twin {} ms, {:.0} breaks)",
                    d.cow.guest_cost_per_break_us,
                    d.cow.shared_run_ms.show(0),
                    d.cow.private_run_ms.show(0),
                    d.cow.breaks_per_rewrite.median
                ),
                "-".into(),
                String::new(),
            ],
            vec![
                format!(
                    "sweep guest ({} MiB, {} passes) while scanning: off / on, ms",
                    o.sweep.mib, o.sweep.passes
                ),
                format!(
                    "{} / {} (x{:.2} medians, x{:.2} fastest runs)",
                    d.slowdown.scanner_off_ms.show(0),
                    d.slowdown.scanner_on_ms.show(0),
                    d.slowdown.ratio,
                    d.slowdown.ratio_min
                ),
                ksm_slow.map_or("-".into(), |s| {
                    format!(
                        "{} / {} (x{:.2} medians, x{:.2} fastest runs)",
                        s.ksm_off_ms.show(0),
                        s.ksm_on_ms.show(0),
                        s.ratio,
                        s.ksm_on_ms.min / s.ksm_off_ms.min
                    )
                }),
                String::new(),
            ],
            vec![
                "scanner CPU in steady operation (re-scanning merged VMs), % of one CPU".into(),
                d.slowdown.scanner_cpu_percent.show(0),
                match (ksm_steady(k), k.series.last()) {
                    (Some(a), Some(b)) if b.t_ms >= a.t_ms + 500 => format!(
                        "{:.0} (ksmd after its steady state, {:.1} s)",
                        (b.ksmd_cpu_ms - a.ksmd_cpu_ms) / (b.t_ms - a.t_ms) as f64 * 100.0,
                        (b.t_ms - a.t_ms) as f64 / 1e3
                    ),
                    _ => format!(
                        "not measured (the run stops at steady state; sleep_millisecs={})",
                        k.setting.sleep_millisecs
                    ),
                },
                String::new(),
            ],
            vec![
                format!(
                    "goal: same savings in <= 1/{} of KSM's time and 1/{} of its CPU",
                    c.goal_time_ratio, c.goal_cpu_ratio
                ),
                format!(
                    "savings {}, time {}, CPU {}",
                    if c.goal_savings_met { "met" } else { "NOT met" },
                    if c.goal_time_met { "met" } else { "NOT met" },
                    if c.goal_cpu_met { "met" } else { "NOT met" }
                ),
                String::new(),
                String::new(),
            ],
        ];
        out += &markdown_table_aligned(&["figure", "disco", "Linux KSM", "KSM / disco"], 3, &rows);

        // Savings over time, both sides, at common instants.
        out += "\nSavings over time (MiB saved; each side's last sample at or before the instant):\n\n";
        let end_ms = self.series_end_ms();
        let at = |t: f64| {
            let dv = d
                .series
                .iter()
                .take_while(|s| s.t_ms <= t)
                .last()
                .map_or(0, |s| s.saved_pages);
            let kv = k
                .series
                .iter()
                .take_while(|s| s.t_ms as f64 <= t)
                .last()
                .map_or(0, |s| s.saved_pages());
            (dv, kv)
        };
        // About a dozen even instants, plus each side's 90 % and 100 % times.
        let step = (end_ms / 12.0).max(1.0);
        let mut instants: Vec<f64> = (0..=12).map(|i| (i as f64 * step).min(end_ms)).collect();
        instants.extend(d.time_to_90pct_ms);
        instants.extend(d.time_to_steady_ms);
        instants.extend(k.time_to_90pct_ms.map(|t| t as f64));
        instants.extend(c.ksm_steady_ms);
        instants.sort_by(f64::total_cmp);
        instants.dedup_by(|a, b| (*a - *b).abs() < 0.5);
        let rows: Vec<Vec<String>> = instants
            .iter()
            .map(|&t| {
                let (dv, kv) = at(t);
                vec![
                    format!("{t:.0}"),
                    mib((dv * PAGE_SIZE as u64) as f64),
                    mib((kv * PAGE_SIZE as u64) as f64),
                ]
            })
            .collect();
        out += &markdown_table_aligned(&["t, ms", "disco, MiB", "KSM, MiB"], 0, &rows);

        out += &format!(
            "\nNotes: disco's expected saving counts every mergeable frame of its guest spaces, \
             including the never-touched all-zero ones (merged onto one zero page); KSM's counts \
             the resident pages of its anonymous regions (each region filled by two micro-VMs, \
             see `bench::ksm`). Host memory disco gave back (pool pages resident after the fill \
             minus at steady state): {} MiB. disco's CPU: {}; the benchmark's own sampling \
             (`sharing_stats`, every {} ms, which holds the memory lock while it walks the memmap \
             and so briefly stalls the scanner) is not counted. KSM samples every {} ms, so its \
             times are rounded up to that; ksmd CPU from {}. {}KSM's settings were restored \
             after the run. {} fill guests took {:.0} ms. Host: {}; load average before / \
             after the run: {} / {}.\n",
            mib(d.host_freed_bytes as f64),
            d.cpu_source,
            o.sample_interval.as_millis(),
            k.config.sample_interval.as_millis(),
            k.ksmd_cpu_source,
            if c.ksm_steady_is_plateau {
                format!(
                    "KSM never reached its prediction ({} of {} pages merged at the end of its \
                     {} s run, pages_volatile {}): its steady state is the plateau it reached \
                     and kept until the end; ksmd kept scanning at full speed meanwhile. ",
                    k.final_stats.saved_pages(),
                    k.expected_bytes_saved / PAGE_SIZE as u64,
                    k.config.timeout.as_secs(),
                    k.final_stats.pages_volatile
                )
            } else {
                String::new()
            },
            o.vms,
            d.fill_ms,
            self.host.describe(),
            self.load_before,
            self.load_after
        );
        out
    }

    /// Writes `sharing.json`, `sharing.md` and `sharing-savings.svg` into
    /// `dir` (created if needed); returns their paths.
    pub fn write_outputs(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("sharing.json");
        let md = dir.join("sharing.md");
        let svg = dir.join("sharing-savings.svg");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let text = format!(
            "## Page sharing: disco vs Linux KSM\n\n{}\n![savings over time](sharing-savings.svg)\n",
            self.render_table()
        );
        std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
        self.savings_plot().write(&svg)?;
        Ok(vec![json, md, svg])
    }
}

// ---------------------------------------------------------------------------
// the suite's view (`disco bench`, benches/scenarios/sharing.toml)
// ---------------------------------------------------------------------------

struct SharingScenario(SharingOptions);

/// Reads a `kind = "sharing"` scenario file: `vms`, `memory_mib` (per VM),
/// `duplicate_fraction` (0 to 1, in hundredths), `shared_run` (disco's
/// layout: frames per block of the shared/private choice), `pages_per_second` (disco's
/// scanner), `cow_reps`, `reps` (sweep runs each with and without the
/// scanner), `sweep_mib`, `sweep_passes`, `timeout_s`, `ksm_timeout_s`,
/// `sample_interval_ms`, `ksm_pages_to_scan`, `ksm_sleep_millisecs`.
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let d = SharingOptions::standard(p.quick());
    let fraction = p.f64(
        "duplicate_fraction",
        0.0,
        1.0,
        d.shared_percent as f64 / 100.0,
    )?;
    let percent = (fraction * 100.0).round();
    if (percent / 100.0 - fraction).abs() > 1e-9 {
        return Err(p.error(
            "duplicate_fraction",
            format!("{fraction} is not a whole percentage; allowed: 0 to 1 in steps of 0.01"),
        ));
    }
    let secs = |key: &str, default: Duration| -> ParamResult<Duration> {
        Ok(Duration::from_secs_f64(p.f64(
            key,
            0.1,
            3600.0,
            default.as_secs_f64(),
        )?))
    };
    let options = SharingOptions {
        vms: p.usize("vms", 2, 256, d.vms)?,
        mib_per_vm: p.u64("memory_mib", 2, 4096, d.mib_per_vm)?,
        shared_percent: percent as u8,
        shared_run: match p.u64("shared_run", 1, 65536, d.shared_run as u64)? {
            r if r.is_power_of_two() => r as u32,
            r => {
                return Err(p.error(
                    "shared_run",
                    format!("{r} is not a power of two; allowed: 1, 2, 4, ... 65536"),
                ))
            }
        },
        pages_per_second: p.u64("pages_per_second", 1, 100_000_000, d.pages_per_second)?,
        cow_reps: p.usize("cow_reps", 1, 256, d.cow_reps)?,
        sweep: SweepOptions {
            mib: p.u64("sweep_mib", 2, 4096, d.sweep.mib)?,
            passes: p.u64("sweep_passes", 1, 1_000_000, d.sweep.passes as u64)? as u32,
            reps: p.usize("reps", 1, 1000, d.sweep.reps)?,
        },
        timeout: secs("timeout_s", d.timeout)?,
        ksm_timeout: secs("ksm_timeout_s", d.ksm_timeout)?,
        sample_interval: Duration::from_millis(p.u64(
            "sample_interval_ms",
            1,
            10_000,
            d.sample_interval.as_millis() as u64,
        )?),
        ksm_setting: KsmSetting {
            pages_to_scan: p.u64(
                "ksm_pages_to_scan",
                1,
                u32::MAX as u64,
                d.ksm_setting.pages_to_scan as u64,
            )? as u32,
            sleep_millisecs: p.u64(
                "ksm_sleep_millisecs",
                0,
                60_000,
                d.ksm_setting.sleep_millisecs as u64,
            )? as u32,
            ..d.ksm_setting
        },
        ..d
    };
    if options.cow_reps > options.vms {
        return Err(p.error(
            "cow_reps",
            format!(
                "{} is more than the {} VMs; allowed: 1 to vms (each rewrite takes one VM)",
                options.cow_reps, options.vms
            ),
        ));
    }
    options
        .validate()
        .map_err(|e| p.error("memory_mib", format!("{e:#}")))?;
    Ok(Box::new(SharingScenario(options)))
}

impl Scenario for SharingScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let options = SharingOptions {
            seed,
            progress: progress.show,
            ..self.0.clone()
        };
        Ok(Box::new(run(&options)?))
    }
}

/// `samples[i] / base[i]` for interleaved repetitions.
fn paired_ratio(on: &Stats, off: &Stats) -> Stats {
    let r: Vec<f64> = on
        .samples
        .iter()
        .zip(&off.samples)
        .map(|(a, b)| a / b)
        .collect();
    Stats::of(&r)
}

impl SharingResult {
    /// The copy-on-write handler time distribution as a CDF.
    pub fn cow_latency_plot(&self) -> LinePlot {
        let p = &self.disco.cow.handler_percentiles_us;
        let points: Vec<(f64, f64)> = p
            .iter()
            .enumerate()
            .map(|(i, &us)| (us, i as f64))
            .collect();
        let mut plot = LinePlot::new(
            &format!(
                "Copy-on-write break: fault handler time ({} breaks)",
                self.disco.cow.breaks
            ),
            "handler time per break (µs)",
            "% of breaks at or below",
        )
        .series("disco (copy + remap + wake)", points);
        if let (Some(med), Some(p99)) = (p.get(50), p.get(99)) {
            plot = plot
                .reference_line(50.0, &format!("median {med:.1} µs"))
                .reference_line(99.0, &format!("p99 {p99:.1} µs"));
        }
        plot
    }
}

impl ScenarioResult for SharingResult {
    fn figures(&self) -> Vec<Figure> {
        let d = &self.disco;
        let k = &self.ksm;
        let c = &self.comparison;
        let mib = |b: u64| b as f64 / MIB;
        let pct = |p: &[f64], i: usize| p.get(i).copied();
        let mut out = vec![
            Figure::maybe(
                "disco: time to 90 % of the savings",
                "ms",
                Better::Lower,
                d.time_to_90pct_ms,
            ),
            Figure::maybe(
                "disco: time to steady state",
                "ms",
                Better::Lower,
                d.time_to_steady_ms,
            )
            .headline(),
            Figure::maybe(
                "disco: monitor CPU to steady state",
                "ms",
                Better::Lower,
                d.monitor_cpu_ms_to_steady,
            )
            .headline(),
            Figure::value(
                "disco: saved at steady state",
                "MiB",
                Better::Higher,
                mib(d.saved_bytes),
            )
            .headline(),
            Figure::value(
                "disco: saved / predicted",
                "fraction",
                Better::Higher,
                c.disco_saved_fraction,
            ),
            Figure::value(
                "disco: host memory given back",
                "MiB",
                Better::Higher,
                d.host_freed_bytes as f64 / MIB,
            ),
            Figure::maybe(
                "KSM: time to steady state",
                "ms",
                Better::Neither,
                c.ksm_steady_ms,
            ),
            Figure::maybe(
                "KSM: ksmd CPU to steady state",
                "ms",
                Better::Neither,
                c.ksm_steady_cpu_ms,
            ),
            Figure::value(
                "KSM: saved at steady state",
                "MiB",
                Better::Neither,
                mib(c.ksm_steady_saved_bytes),
            ),
            Figure::maybe(
                "KSM time / disco time (steady state)",
                "ratio",
                Better::Higher,
                c.time_ratio_steady,
            )
            .headline(),
            Figure::maybe(
                "KSM CPU / disco CPU (steady state)",
                "ratio",
                Better::Higher,
                c.cpu_ratio_steady,
            )
            .headline(),
            Figure::maybe(
                "copy-on-write break: handler median",
                "µs",
                Better::Lower,
                pct(&d.cow.handler_percentiles_us, 50),
            )
            .headline(),
            Figure::maybe(
                "copy-on-write break: handler p99",
                "µs",
                Better::Lower,
                pct(&d.cow.handler_percentiles_us, 99),
            ),
            Figure::value(
                "copy-on-write break: handler CPU per break",
                "µs",
                Better::Lower,
                d.cow.handler_cpu_us_per_break,
            ),
            Figure::value(
                "copy-on-write break: cost to the guest",
                "µs",
                Better::Lower,
                d.cow.guest_cost_per_break_us,
            ),
            Figure::new(
                "sweep guest slowdown while disco scans",
                "ratio",
                Better::Lower,
                paired_ratio(&d.slowdown.scanner_on_ms, &d.slowdown.scanner_off_ms),
            ),
            Figure::new(
                "disco scanner CPU once merged",
                "% of a CPU",
                Better::Lower,
                d.slowdown.scanner_cpu_percent.clone(),
            ),
        ];
        if let Some(s) = &k.slowdown {
            out.push(Figure::new(
                "sweep guest slowdown while KSM scans",
                "ratio",
                Better::Neither,
                paired_ratio(&s.ksm_on_ms, &s.ksm_off_ms),
            ));
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        vec![
            Plot {
                name: "savings".into(),
                title: "Memory saved over time, disco and KSM".into(),
                svg: self.savings_plot().render(),
            },
            Plot {
                name: "cow-latency".into(),
                title: "Copy-on-write break latency distribution".into(),
                svg: self.cow_latency_plot().render(),
            },
        ]
    }

    fn markdown(&self) -> String {
        self.render_table()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_groups_contents() {
        let h: FrameHashes = vec![
            vec![None, Some((true, 0)), Some((false, 5)), Some((false, 6))],
            vec![None, Some((true, 0)), Some((false, 5)), Some((false, 7))],
            vec![None, Some((true, 0)), Some((false, 5)), Some((false, 8))],
        ];
        let c = census(&h);
        assert_eq!(c.frames, 12);
        assert_eq!(c.excluded_frames, 3);
        assert_eq!(c.zero_frames, 3);
        assert_eq!(c.distinct_contents, 5);
        // Content 5 saves 2; every zero frame is released (3).
        assert_eq!(c.duplicate_groups, 1);
        assert_eq!(c.expected_saved_pages, 5);
        assert_eq!(c.expected_saved_zero_pages, 3);
    }

    #[test]
    fn options_are_valid_and_match_the_ksm_side() {
        for o in [
            SharingOptions::standard(false),
            SharingOptions::standard(true),
            SharingOptions::tiny(),
        ] {
            o.validate().unwrap();
            let k = o.ksm_config();
            assert_eq!(
                (k.vms, k.mib_per_vm as u64, k.seed),
                (o.vms, o.mib_per_vm, o.seed)
            );
            assert_eq!(k.shared_fraction * 100.0, o.shared_percent as f64);
        }
        let bad = SharingOptions {
            vms: 1,
            ..SharingOptions::tiny()
        };
        assert!(bad.validate().is_err());
    }
}
