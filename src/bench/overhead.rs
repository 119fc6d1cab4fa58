//! The overhead scenario: one workload run by `disco` (the real monitor,
//! `monitor::run`), by the bare-KVM runner on anonymous memory
//! ([`super::bare`]) and, with `shmem_baseline`, by the bare runner on a
//! shared memfd (disco's memory type), in turn, in one process run.
//!
//! Per case: one untimed warm-up run of each, then `reps` repetitions of
//! the sides, each repetition starting one side further along so that slow
//! drift of a noisy host hits every side alike.
//! Each run is timed from the caller's side, wall clock:
//!
//! * disco: `monitor::run` (topology, pools, building the VMs, `verify`
//!   before/during/after, the progress-polling loop, teardown) plus dropping
//!   its pools; with the `static` policy this is the monitor itself, with
//!   the default `disco` policy the sharing scanner and copy-on-write
//!   handler run too;
//! * bare: opening KVM, `mmap`, creating, starting, checking every 1 ms
//!   whether the vCPUs exited, joining, `munmap`;
//!
//! both compute the host model's checksums once per run, after the guests
//! exit (`MicroVm::wait`). Next to the wall time each run records its create
//! time and its guest run time (start to last vCPU exit,
//! `VmOutcome::run_time`, the same definition on both sides); the checksum
//! model is also timed on its own once per repetition, because for sweeps it
//! costs as much as the guest and is the same on both sides. The ratios in
//! `ratio_*` are of medians, disco / bare; the figures, goal checks and plot
//! use paired ratios (per repetition), with the 95 % interval of their
//! median ([`Stats::median_interval_95`]): a goal is "met" or "missed" only
//! when the whole interval says so. A wrong checksum on any side is an
//! error.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::bare::{self, BareMemory};
use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::BarPlot;
use super::{config_doc, config_from_doc, markdown_table_aligned, progress_bar, HostInfo, Stats};
use crate::config::{Config, ConfigFile, HostSpec, PolicyRef, VmSpec};
use crate::guest::{layout, model, Workload};
use crate::monitor::{self, RunOptions};
use crate::report::{RunReport, VmCosts, VmReport};
use crate::vm::ThreadCpu;

/// The policy of the cases that measure the monitor itself: memory stays
/// where it was placed, no sharing scanner, no copy-on-write.
pub const STATIC: &str = "static";
/// The default policy of `disco run` (sharing on: the scanner and the
/// userfaultfd copy-on-write handler run with the guests).
pub const DEFAULT_POLICY: &str = "disco";

/// One workload of the scenario: a config, as `disco run` reads it. The bare
/// runner runs the same `[[vm]]`s; the policy applies to disco only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverheadCase {
    /// Short name (table rows, criterion ids): workload/policy.
    pub name: String,
    /// What runs, in words.
    pub description: String,
    /// The shipped policy disco runs with.
    pub policy: String,
    /// The config (policy, VMs; host topology).
    pub config: ConfigFile,
    /// The most disco's guest run may take against bare KVM's (paired
    /// ratio), the goal the README holds the full policy to:
    /// [`GOAL_STEADY`] or [`GOAL_FILL`].
    #[serde(default)]
    pub goal: Option<f64>,
}

/// Guest-run goal of the full policy against bare KVM for steady-state
/// access (`sweep`, `random`): 2 %.
pub const GOAL_STEADY: f64 = 1.02;
/// Guest-run goal for `fill`: 10 %, since first touches of the monitor's
/// shared-memory pools cost more than of the bare runner's anonymous memory.
pub const GOAL_FILL: f64 = 1.10;

impl OverheadCase {
    fn new(name: String, description: String, policy: &str, vm: VmSpec) -> OverheadCase {
        let fill = vm.workload.as_ref().and_then(|w| w.kind.as_deref()) == Some("fill");
        let goal = if fill { GOAL_FILL } else { GOAL_STEADY };
        OverheadCase {
            name: format!("{name}/{policy}"),
            description,
            policy: policy.to_string(),
            config: config_doc(PolicyRef::Named(policy.to_string()), "host", vec![vm]),
            goal: Some(goal),
        }
    }

    /// The one VM of a case: `vcpus`, `memory_mib`, `workload`, 600 s.
    fn vm(name: &str, vcpus: u32, memory_mib: u64, workload: Workload) -> VmSpec {
        VmSpec {
            time_limit_s: Some(600.0),
            ..VmSpec::micro(name, vcpus.into(), memory_mib, (&workload).into())
        }
    }

    /// One VM sweeping its memory: fill, then `passes` read-modify-write
    /// sweeps (steady-state guest memory access).
    pub fn sweep(memory_mib: u64, vcpus: u32, passes: u32, policy: &str) -> OverheadCase {
        OverheadCase::sweep_seeded(memory_mib, vcpus, passes, policy, 11)
    }

    /// [`OverheadCase::sweep`] with the workload's seed.
    pub fn sweep_seeded(
        memory_mib: u64,
        vcpus: u32,
        passes: u32,
        policy: &str,
        seed: u64,
    ) -> OverheadCase {
        OverheadCase::new(
            format!("sweep-{memory_mib}MiB-{vcpus}vcpu-{passes}passes"),
            format!(
                "1 VM, {vcpus} vCPUs, {memory_mib} MiB: fill, then {passes} read-modify-write \
                 passes; disco policy {policy}"
            ),
            policy,
            OverheadCase::vm("sweep", vcpus, memory_mib, Workload::Sweep { seed, passes }),
        )
    }

    /// One VM filling its memory once (first touch of every page: dominated
    /// by the host's page faults).
    pub fn fill(memory_mib: u64, vcpus: u32, policy: &str) -> OverheadCase {
        OverheadCase::fill_seeded(memory_mib, vcpus, policy, 7)
    }

    /// [`OverheadCase::fill`] with the workload's seed.
    pub fn fill_seeded(memory_mib: u64, vcpus: u32, policy: &str, seed: u64) -> OverheadCase {
        OverheadCase::new(
            format!("fill-{memory_mib}MiB-{vcpus}vcpu"),
            format!(
                "1 VM, {vcpus} vCPUs, {memory_mib} MiB: fill every page once (first touch); \
                 disco policy {policy}"
            ),
            policy,
            OverheadCase::vm(
                "fill",
                vcpus,
                memory_mib,
                Workload::Fill {
                    seed,
                    private_seed: seed,
                    shared_percent: 100,
                    shared_run: 1,
                },
            ),
        )
    }

    /// One VM touching random pages of its memory (`touches` random
    /// read-modify-writes: each touch a likely TLB and cache miss, the
    /// access pattern page sampling sees the most of).
    pub fn random_seeded(
        memory_mib: u64,
        vcpus: u32,
        touches: u64,
        policy: &str,
        seed: u64,
    ) -> OverheadCase {
        OverheadCase::new(
            format!("random-{memory_mib}MiB-{vcpus}vcpu"),
            format!(
                "1 VM, {vcpus} vCPUs, {memory_mib} MiB: {touches} touches of random pages; \
                 disco policy {policy}"
            ),
            policy,
            OverheadCase::vm(
                "random",
                vcpus,
                memory_mib,
                Workload::Random { seed, touches },
            ),
        )
    }

    pub fn parse(&self) -> Result<Config> {
        config_from_doc(self.config.clone())
    }

    /// The case on a topology (`host`, a fixture name or an hwloc XML path).
    pub fn on_topology(mut self, topology: &str) -> OverheadCase {
        if topology != "host" {
            self.config
                .host
                .get_or_insert_with(HostSpec::default)
                .topology = Some(topology.to_string());
        }
        self
    }

    /// The case with guest RAM in 4 KiB shmem folios only (`[host]
    /// large_folios = false`), named `.../4k-folios`.
    pub fn with_small_folios(mut self) -> OverheadCase {
        self.config
            .host
            .get_or_insert_with(HostSpec::default)
            .large_folios = Some(false);
        self.name += "/4k-folios";
        self.description += "; 4 KiB shmem folios only";
        self
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct OverheadOptions {
    pub cases: Vec<OverheadCase>,
    /// Timed repetitions of each side per case.
    pub reps: usize,
    /// One untimed run of each side per case first.
    pub warmup: bool,
    /// A third side: the bare runner on shmem (`BareMemory::Shmem`), the
    /// memory type of disco's pools, to split disco's cost into the memory
    /// type's and the monitor's.
    pub shmem_baseline: bool,
    /// Progress bar on stderr.
    pub progress: bool,
    /// A shmem folio size (kB) the host allows for the run (its
    /// `shmem_enabled` set to `advise`, put back after); 0 leaves the
    /// host as it is. See `crate::memory::folios`.
    pub shmem_folio_kib: u32,
}

impl OverheadOptions {
    /// `disco bench overhead`: a 64 MiB, 2-vCPU sweep (16 passes) and fill
    /// with disco on the `static` policy (the monitor itself); 10
    /// repetitions (3 with `quick`).
    pub fn standard(quick: bool) -> OverheadOptions {
        OverheadOptions::with_policies(quick, &[STATIC])
    }

    /// The standard workloads once per disco policy in `policies` (shipped
    /// policy names, e.g. [`STATIC`] and [`DEFAULT_POLICY`]).
    pub fn with_policies(quick: bool, policies: &[&str]) -> OverheadOptions {
        OverheadOptions {
            cases: policies
                .iter()
                .flat_map(|p| {
                    [
                        OverheadCase::sweep(64, 2, 16, p),
                        OverheadCase::fill(64, 2, p),
                    ]
                })
                .collect(),
            reps: if quick { 3 } else { 10 },
            warmup: true,
            shmem_baseline: true,
            progress: false,
            shmem_folio_kib: 0,
        }
    }

    /// A small configuration for tests: 4 MiB, 1 vCPU, static policy, 2
    /// repetitions.
    pub fn tiny() -> OverheadOptions {
        OverheadOptions {
            cases: vec![
                OverheadCase::sweep(4, 1, 2, STATIC),
                OverheadCase::fill(4, 1, STATIC),
            ],
            reps: 2,
            warmup: false,
            shmem_baseline: true,
            progress: false,
            shmem_folio_kib: 0,
        }
    }
}

/// One run of one side, ms.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// The whole run, seen by the caller.
    pub wall: f64,
    /// Up to every VM created (disco: the report's `create_ms`, which also
    /// covers building the pools).
    pub create: f64,
    /// Start to last vCPU exit (longest over the VMs).
    pub guest_run: f64,
    /// CPU time of every VM's vCPU threads, user (with guest mode) plus
    /// system, and the system part alone.
    pub vcpu_cpu: f64,
    pub vcpu_system: f64,
    /// The vCPU threads' time waiting for a CPU, and blocked (see
    /// `vm::ThreadCpu`).
    pub vcpu_waiting: f64,
    pub vcpu_blocked: f64,
    /// disco only: what the policy cost the (first) VM, from the report.
    pub costs: Option<VmCosts>,
}

/// One side (disco or bare) of one case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideResult {
    /// Whole run, wall clock, ms.
    pub wall_ms: Stats,
    /// Opening KVM, (disco: pools,) guest memory, creating the VMs, ms.
    pub create_ms: Stats,
    /// Guest run time (start to last vCPU exit), ms.
    pub guest_run_ms: Stats,
    /// CPU time of the vCPU threads (user, which includes guest mode, plus
    /// system), and its system part (VM exits, page faults), ms. Time a
    /// vCPU thread was descheduled or blocked is not in it.
    #[serde(default)]
    pub vcpu_cpu_ms: Stats,
    #[serde(default)]
    pub vcpu_system_ms: Stats,
    /// The vCPU threads' time runnable but waiting for a CPU, and blocked
    /// (userfaultfd waits, pauses), ms; 0 where the kernel keeps no
    /// scheduler statistics.
    #[serde(default)]
    pub vcpu_waiting_ms: Stats,
    #[serde(default)]
    pub vcpu_blocked_ms: Stats,
    /// Wall minus create minus guest run, per run, ms: starting, noticing
    /// the end, the checksum model, joining, (disco: verify, report,)
    /// teardown.
    pub rest_ms: Stats,
    /// disco only, from each run's report (`report::VmCosts`): the share
    /// of the VM's vCPU time spent in sampled faults, copy-on-write breaks
    /// and remap pauses, and those parts in ms; breaks; whether the
    /// sampling cap held the sampler back (1) or not (0).
    #[serde(default)]
    pub policy_cost: Option<Stats>,
    #[serde(default)]
    pub sampling_ms: Option<Stats>,
    /// Of `sampling_ms`, the monitor's CPU time zapping the VM's pages
    /// (charged while no host CPU was idle), ms.
    #[serde(default)]
    pub sampling_zap_ms: Option<Stats>,
    #[serde(default)]
    pub cow_break_ms: Option<Stats>,
    #[serde(default)]
    pub paused_ms: Option<Stats>,
    #[serde(default)]
    pub cow_breaks: Option<Stats>,
    #[serde(default)]
    pub sampling_capped: Option<Stats>,
}

impl SideResult {
    fn of(runs: &[Measured]) -> SideResult {
        let s = |f: fn(&Measured) -> f64| Stats::of(&runs.iter().map(f).collect::<Vec<_>>());
        let cost = |f: fn(&VmCosts) -> f64| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.costs.as_ref().map(f))
                .collect();
            (!v.is_empty()).then(|| Stats::of(&v))
        };
        SideResult {
            wall_ms: s(|m| m.wall),
            create_ms: s(|m| m.create),
            guest_run_ms: s(|m| m.guest_run),
            vcpu_cpu_ms: s(|m| m.vcpu_cpu),
            vcpu_system_ms: s(|m| m.vcpu_system),
            vcpu_waiting_ms: s(|m| m.vcpu_waiting),
            vcpu_blocked_ms: s(|m| m.vcpu_blocked),
            rest_ms: s(|m| m.wall - m.create - m.guest_run),
            policy_cost: cost(|c| c.overhead),
            sampling_ms: cost(|c| c.sampling_ms),
            sampling_zap_ms: cost(|c| c.sampling_zap_ms),
            cow_break_ms: cost(|c| c.cow_break_ms),
            paused_ms: cost(|c| c.paused_ms),
            cow_breaks: cost(|c| c.cow_breaks as f64),
            sampling_capped: cost(|c| (c.sampling_capped_rounds > 0) as u8 as f64),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: OverheadCase,
    pub disco: SideResult,
    /// The bare runner on anonymous memory.
    pub bare: SideResult,
    /// The bare runner on shmem, with `shmem_baseline`.
    #[serde(default)]
    pub bare_shmem: Option<SideResult>,
    /// The host model's checksums for the case, timed on their own (once
    /// per repetition), ms. Both sides compute them once per run, inside
    /// their wall time.
    pub checksum_model_ms: Stats,
    /// disco wall median / bare wall median.
    pub ratio_wall: f64,
    /// (disco wall median - model median) / (bare wall median - model median).
    pub ratio_wall_without_model: f64,
    /// disco guest-run median / bare guest-run median.
    pub ratio_guest_run: f64,
    /// disco vCPU CPU-time median / bare vCPU CPU-time median.
    #[serde(default)]
    pub ratio_vcpu_cpu: f64,
    /// The paired guest-run ratio against the case's goal.
    #[serde(default)]
    pub goal_check: Option<GoalCheck>,
    /// The same against the bare runner on shmem: what the monitor and
    /// its policy cost beyond their memory type.
    #[serde(default)]
    pub goal_check_shmem: Option<GoalCheck>,
}

impl CaseResult {
    /// The sides that ran, named: disco, bare, and bare on shmem when it
    /// ran.
    fn sides(&self) -> impl Iterator<Item = (&'static str, &SideResult)> {
        [
            ("disco", Some(&self.disco)),
            ("bare", Some(&self.bare)),
            ("bare on shmem", self.bare_shmem.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, side)| Some((name, side?)))
    }
}

/// Whether disco's guest run, as a paired ratio to bare KVM's, keeps to a
/// goal. One run of a noisy host says little; the verdict rests on the 95 %
/// interval of the paired ratios' median, so "met" and "missed" are claims
/// the repetitions support and everything between is "undecided".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoalCheck {
    pub goal: f64,
    /// Median of disco/bare guest run per repetition.
    pub median: f64,
    /// Its 95 % interval ([`Stats::median_interval_95`]); none below 6
    /// repetitions.
    pub interval_95: Option<(f64, f64)>,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The whole interval is at or below the goal.
    Met,
    /// The whole interval is above the goal.
    Missed,
    /// The interval straddles the goal (or there are too few repetitions):
    /// more repetitions or a quieter host would tell.
    Undecided,
}

impl GoalCheck {
    pub fn of(goal: f64, paired: &Stats) -> GoalCheck {
        let interval_95 = paired.median_interval_95();
        let verdict = match interval_95 {
            Some((_, hi)) if hi <= goal => Verdict::Met,
            Some((lo, _)) if lo > goal => Verdict::Missed,
            _ => Verdict::Undecided,
        };
        GoalCheck {
            goal,
            median: paired.median,
            interval_95,
            verdict,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::Undecided => "undecided",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverheadResult {
    pub host: HostInfo,
    pub reps: usize,
    pub warmup: bool,
    pub cases: Vec<CaseResult>,
}

/// One disco run. An error unless every VM is ok and every invariant check
/// held.
pub fn run_disco(config: &Config) -> Result<Measured> {
    let options = RunOptions::quiet();
    let t = Instant::now();
    let report = monitor::run(config, &options)?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    check_report(&report)?;
    Ok(Measured {
        wall,
        create: report.create_ms,
        guest_run: report.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max),
        vcpu_cpu: report
            .vms
            .iter()
            .map(|v| v.costs.vcpu_user_ms + v.costs.vcpu_system_ms)
            .sum(),
        vcpu_system: report.vms.iter().map(|v| v.costs.vcpu_system_ms).sum(),
        vcpu_waiting: report.vms.iter().map(|v| v.costs.vcpu_waiting_ms).sum(),
        vcpu_blocked: report.vms.iter().map(|v| v.costs.vcpu_blocked_ms).sum(),
        costs: report.vms.first().map(|v| v.costs.clone()),
    })
}

fn check_report(report: &RunReport) -> Result<()> {
    if report.all_ok() {
        return Ok(());
    }
    let why: Vec<String> = report
        .vms
        .iter()
        .filter(|v| !v.ok())
        .map(VmReport::status_line)
        .chain(report.verify_errors.iter().cloned())
        .collect();
    bail!("disco: the run is not ok: {}", why.join("; "))
}

/// One bare run on `memory`. An error unless every checksum matches.
pub fn run_bare(config: &Config, memory: BareMemory) -> Result<Measured> {
    let topology = config.topology()?;
    let t = Instant::now();
    let run = bare::run_checked(config, &topology, memory)?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    // One part of the vCPU threads' time, summed over the VMs, ms.
    let vcpu_ms = |part: fn(&ThreadCpu) -> Duration| -> f64 {
        run.outcomes
            .iter()
            .map(|o| part(&o.vcpu_cpu).as_secs_f64() * 1e3)
            .sum()
    };
    Ok(Measured {
        wall,
        create: run.create.as_secs_f64() * 1e3,
        guest_run: run.guest_run().as_secs_f64() * 1e3,
        vcpu_cpu: vcpu_ms(|c| c.total()),
        vcpu_system: vcpu_ms(|c| c.system),
        vcpu_waiting: vcpu_ms(|c| c.waiting),
        vcpu_blocked: vcpu_ms(|c| c.blocked),
        costs: None,
    })
}

/// Times the host model's checksums of every VM of `config` (what
/// `MicroVm::wait` computes), ms.
pub fn time_checksum_model(config: &Config) -> Result<f64> {
    let t = Instant::now();
    for vc in &config.vms {
        let params = layout::plan(
            &vc.workload,
            vc.memory_mib * 1024 * 1024,
            vc.vcpu_nodes.len(),
        )
        .map_err(anyhow::Error::msg)?;
        std::hint::black_box(model::expected_results(&vc.workload, &params));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// One side of a repetition.
#[derive(Clone, Copy, Debug)]
enum Side {
    Disco,
    Bare(BareMemory),
}

impl Side {
    fn run(self, config: &Config) -> Result<Measured> {
        match self {
            Side::Disco => run_disco(config),
            Side::Bare(memory) => run_bare(config, memory),
        }
    }
}

/// Runs the scenario.
pub fn run(options: &OverheadOptions) -> Result<OverheadResult> {
    if options.reps == 0 {
        bail!("the overhead scenario needs at least one repetition");
    }
    let _folios = super::allow_shmem_folios(options.shmem_folio_kib)?;
    // The sides of a repetition, in the order of the first; each
    // repetition starts one further along, so that slow drift of a noisy
    // host hits every side alike.
    let mut sides = vec![Side::Disco, Side::Bare(BareMemory::Anonymous)];
    if options.shmem_baseline {
        sides.push(Side::Bare(BareMemory::Shmem));
    }
    let per_case = (options.reps + usize::from(options.warmup)) * sides.len();
    let bar = progress_bar((per_case * options.cases.len()) as u64, options.progress);
    let mut cases = Vec::new();
    for case in &options.cases {
        let config = case.parse()?;
        if options.warmup {
            bar.set_message(format!("{}: warm-up", case.name));
            for side in &sides {
                side.run(&config)?;
                bar.inc(1);
            }
        }
        let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); sides.len()];
        let mut model = Vec::new();
        for rep in 0..options.reps {
            bar.set_message(format!(
                "{}: repetition {}/{}",
                case.name,
                rep + 1,
                options.reps
            ));
            for k in 0..sides.len() {
                let i = (rep + k) % sides.len();
                runs[i].push(sides[i].run(&config)?);
                bar.inc(1);
            }
            model.push(time_checksum_model(&config)?);
        }
        let disco = SideResult::of(&runs[0]);
        let bare = SideResult::of(&runs[1]);
        let bare_shmem = runs.get(2).map(|r| SideResult::of(r));
        let model = Stats::of(&model);
        let check = |baseline: &SideResult| {
            case.goal
                .map(|g| GoalCheck::of(g, &paired(&disco.guest_run_ms, &baseline.guest_run_ms)))
        };
        cases.push(CaseResult {
            case: case.clone(),
            ratio_wall: disco.wall_ms.median / bare.wall_ms.median,
            ratio_wall_without_model: (disco.wall_ms.median - model.median)
                / (bare.wall_ms.median - model.median),
            ratio_guest_run: disco.guest_run_ms.median / bare.guest_run_ms.median,
            ratio_vcpu_cpu: disco.vcpu_cpu_ms.median / bare.vcpu_cpu_ms.median,
            goal_check: check(&bare),
            goal_check_shmem: bare_shmem.as_ref().and_then(check),
            bare_shmem,
            checksum_model_ms: model,
            disco,
            bare,
        });
    }
    bar.finish_and_clear();
    Ok(OverheadResult {
        host: HostInfo::detect(),
        reps: options.reps,
        warmup: options.warmup,
        cases,
    })
}

impl OverheadResult {
    /// Paired ratios per case with the 95 % interval of their median, and
    /// the guest-run verdicts against the goal, against each baseline.
    fn render_goal_table(&self) -> String {
        let with_interval = |s: &Stats| match s.median_interval_95() {
            Some((lo, hi)) => format!("{:.3} [{lo:.3}-{hi:.3}]", s.median),
            None => format!("{:.3} [too few]", s.median),
        };
        let verdict = |g: &Option<GoalCheck>| {
            g.as_ref()
                .map_or("-".into(), |g| format!("{} ({:.2})", g.verdict, g.goal))
        };
        let rows: Vec<Vec<String>> = self
            .cases
            .iter()
            .map(|c| {
                let ratio = |a: &Stats, b: &Stats| with_interval(&paired(a, b));
                // A column of the shmem side, "-" without one.
                let with_shmem = |column: &dyn Fn(&SideResult) -> String| {
                    c.bare_shmem.as_ref().map_or("-".into(), column)
                };
                vec![
                    c.case.name.clone(),
                    ratio(&c.disco.guest_run_ms, &c.bare.guest_run_ms),
                    verdict(&c.goal_check),
                    with_shmem(&|s| ratio(&s.guest_run_ms, &c.bare.guest_run_ms)),
                    with_shmem(&|s| ratio(&c.disco.guest_run_ms, &s.guest_run_ms)),
                    verdict(&c.goal_check_shmem),
                    ratio(&c.disco.vcpu_cpu_ms, &c.bare.vcpu_cpu_ms),
                    with_shmem(&|s| ratio(&s.vcpu_system_ms, &c.bare.vcpu_system_ms)),
                ]
            })
            .collect();
        let mut out = String::from(
            "\nPer repetition (its runs adjacent), paired ratios: median [95 % interval of the \
             median, sign test]. A goal (guest run) is met when the whole interval is at or below \
             it, missed when the whole interval is above it, undecided otherwise. The shmem \
             baseline is the bare runner on a memfd mapped shared, disco's memory type: \
             shmem/anonymous is what that memory type costs, disco/shmem what the monitor and its \
             policy add:\n\n",
        );
        out += &markdown_table_aligned(
            &[
                "workload",
                "disco/anonymous guest run",
                "goal",
                "shmem/anonymous guest run",
                "disco/shmem guest run",
                "goal",
                "disco/anonymous vCPU CPU",
                "shmem/anonymous vCPU system",
            ],
            1,
            &rows,
        );
        out
    }

    /// Markdown: one row per case and side, then the ratios.
    pub fn render_table(&self) -> String {
        let mut out = format!(
            "disco vs bare KVM on anonymous memory: {} repetitions each, interleaved in one run{}; \
             median (min-max), ms\n\n",
            self.reps,
            if self.warmup {
                ", after one warm-up run each"
            } else {
                ""
            }
        );
        let mut rows = Vec::new();
        for c in &self.cases {
            for (side, r) in c.sides() {
                rows.push(vec![
                    c.case.name.clone(),
                    side.to_string(),
                    r.wall_ms.show(1),
                    r.create_ms.show(1),
                    r.guest_run_ms.show(1),
                    r.vcpu_cpu_ms.show(1),
                    r.vcpu_system_ms.show(1),
                    r.vcpu_waiting_ms.show(1),
                    r.vcpu_blocked_ms.show(1),
                    r.rest_ms.show(1),
                ]);
            }
            rows.push(vec![
                c.case.name.clone(),
                "(checksum model alone)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                c.checksum_model_ms.show(1),
            ]);
        }
        out += &markdown_table_aligned(
            &[
                "workload",
                "runner",
                "wall",
                "create",
                "guest run",
                "vCPU CPU",
                "of it system",
                "vCPU waiting for a CPU",
                "vCPU blocked",
                "rest (incl. checksum model)",
            ],
            2,
            &rows,
        );
        out += "\n";
        let rows: Vec<Vec<String>> = self
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.case.name.clone(),
                    c.case.description.clone(),
                    format!("{:.2}", c.ratio_wall),
                    format!("{:.2}", c.ratio_wall_without_model),
                    format!("{:.2}", c.ratio_guest_run),
                    format!("{:.2}", c.ratio_vcpu_cpu),
                ]
            })
            .collect();
        out += &markdown_table_aligned(
            &[
                "workload",
                "what runs",
                "disco/bare wall",
                "disco/bare wall without the checksum model",
                "disco/bare guest run",
                "disco/bare vCPU CPU",
            ],
            2,
            &rows,
        );
        out += &self.render_goal_table();
        let rows: Vec<Vec<String>> = self
            .cases
            .iter()
            .filter_map(|c| {
                let d = &c.disco;
                let show =
                    |s: &Option<Stats>, digits| s.as_ref().map_or("-".into(), |s| s.show(digits));
                d.policy_cost.as_ref()?;
                Some(vec![
                    c.case.name.clone(),
                    d.policy_cost.as_ref().map_or("-".into(), |s| {
                        format!(
                            "{:.2} % ({:.2}-{:.2})",
                            100.0 * s.median,
                            100.0 * s.min,
                            100.0 * s.max
                        )
                    }),
                    show(&d.sampling_ms, 1),
                    show(&d.sampling_zap_ms, 1),
                    show(&d.cow_breaks, 0),
                    show(&d.cow_break_ms, 1),
                    show(&d.paused_ms, 1),
                    show(&d.sampling_capped, 2),
                ])
            })
            .collect();
        if !rows.is_empty() {
            out += "\nWhat the policy cost the guest, from each disco run's report (share of the VM's vCPU time: \
                    sampled faults charged as measured handler time plus `sample_fault_cost_us` each, \
                    plus the monitor's CPU time zapping the VM's pages while no host CPU was idle; \
                    copy-on-write handler time, remap pauses x vCPUs):\n\n";
            out += &markdown_table_aligned(
                &[
                    "workload",
                    "policy cost / vCPU time",
                    "sampling ms",
                    "of it zapping",
                    "COW breaks",
                    "COW ms",
                    "paused ms",
                    "runs capped",
                ],
                1,
                &rows,
            );
        }
        out += &format!(
            "\nRatios are of medians. Wall: the whole run seen by the caller (disco: `monitor::run`: \
             pools, VM build, verify before/during/after, 10 ms progress polling, report, teardown; \
             bare: mmap, create, start, 1 ms exit polling, join, munmap); both compute the host \
             model's checksums once per run after the guests exit. Guest run: start to last vCPU \
             exit. vCPU CPU: CPU time of the vCPU threads (user, which includes guest mode, plus \
             system: exits, page faults), which leaves out time they were descheduled or blocked. \
             Host: {}.\n",
            self.host.describe()
        );
        out
    }
}

// ---------------------------------------------------------------------------
// the suite's view (`disco bench`, benches/scenarios/overhead.toml)
// ---------------------------------------------------------------------------

/// Workloads of the overhead scenario, by name.
pub const WORKLOADS: &[&str] = &["sweep", "fill", "random"];

#[derive(Clone, Debug)]
struct OverheadScenario {
    workloads: Vec<String>,
    memory_mib: u64,
    vcpus: u32,
    passes: u32,
    touches: u64,
    policies: Vec<String>,
    topology: String,
    reps: usize,
    warmup: bool,
    shmem_baseline: bool,
    /// `"large"` (the default: guest RAM may ask for large shmem folios)
    /// and/or `"4k"` (`[host] large_folios = false`): one case each.
    folios: Vec<String>,
    shmem_folio_kib: u32,
}

impl OverheadScenario {
    fn options(&self, seed: u64) -> OverheadOptions {
        let mut cases = Vec::new();
        for p in &self.policies {
            for w in &self.workloads {
                let case = match w.as_str() {
                    "sweep" => OverheadCase::sweep_seeded(
                        self.memory_mib,
                        self.vcpus,
                        self.passes,
                        p,
                        seed,
                    ),
                    "random" => OverheadCase::random_seeded(
                        self.memory_mib,
                        self.vcpus,
                        self.touches,
                        p,
                        seed,
                    ),
                    _ => OverheadCase::fill_seeded(self.memory_mib, self.vcpus, p, seed),
                };
                for f in &self.folios {
                    let case = case.clone().on_topology(&self.topology);
                    cases.push(if f == "4k" {
                        case.with_small_folios()
                    } else {
                        case
                    });
                }
            }
        }
        OverheadOptions {
            cases,
            reps: self.reps,
            warmup: self.warmup,
            shmem_baseline: self.shmem_baseline,
            progress: false,
            shmem_folio_kib: self.shmem_folio_kib,
        }
    }
}

/// Reads a `kind = "overhead"` scenario file: `workloads` (sweep, fill,
/// random), `memory_mib`, `vcpus`, `passes` (sweep), `touches` (random),
/// `policies` (disco's side),
/// `topology`, `reps`, `warmup`, `shmem_baseline`, `folios` (`large`,
/// `4k`), `shmem_folio_kib` (0, or a size from 16 to 2048 the host allows
/// for the run).
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let s = OverheadScenario {
        workloads: p.str_list("workloads", Some(WORKLOADS), WORKLOADS)?,
        memory_mib: p.u64("memory_mib", 2, crate::config::MAX_MEMORY_MIB, 64)?,
        vcpus: p.u64("vcpus", 1, crate::config::MAX_VCPUS, 2)? as u32,
        passes: p.u64("passes", 1, 1_000_000, 16)? as u32,
        touches: p.u64("touches", 1, 100_000_000_000, 20_000_000)?,
        policies: p.policies("policies", &[STATIC, DEFAULT_POLICY])?,
        topology: p.topology("topology", "host")?,
        reps: p.usize("reps", 1, 1000, if quick { 3 } else { 10 })?,
        warmup: p.bool("warmup", true)?,
        shmem_baseline: p.bool("shmem_baseline", true)?,
        folios: p.str_list("folios", Some(&["large", "4k"]), &["large"])?,
        shmem_folio_kib: p.folio_kib("shmem_folio_kib")?,
    };
    for case in s.options(1).cases {
        case.parse().map_err(|e| {
            let mut err = super::blame_config_error(p, &e, &case.policy, "policies", "memory_mib");
            err.message = format!("case {}: {}", case.name, err.message);
            err
        })?;
    }
    Ok(Box::new(s))
}

impl Scenario for OverheadScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let mut options = self.options(seed);
        options.progress = progress.show;
        Ok(Box::new(run(&options)?))
    }

    fn policies(&self) -> Vec<String> {
        self.policies.clone()
    }
}

/// disco / bare per repetition (the two runs of a repetition are adjacent).
fn paired(disco: &Stats, bare: &Stats) -> Stats {
    let r: Vec<f64> = disco
        .samples
        .iter()
        .zip(&bare.samples)
        .map(|(d, b)| d / b)
        .collect();
    Stats::of(&r)
}

impl ScenarioResult for OverheadResult {
    fn figures(&self) -> Vec<Figure> {
        let mut out = Vec::new();
        for c in &self.cases {
            let n = &c.case.name;
            out.extend([
                Figure::new(
                    &format!("{n}: disco/bare wall"),
                    "ratio",
                    Better::Lower,
                    paired(&c.disco.wall_ms, &c.bare.wall_ms),
                )
                .headline(),
                Figure::new(
                    &format!("{n}: disco/bare guest run"),
                    "ratio",
                    Better::Lower,
                    paired(&c.disco.guest_run_ms, &c.bare.guest_run_ms),
                )
                .headline(),
                Figure::new(
                    &format!("{n}: disco/bare vCPU CPU time"),
                    "ratio",
                    Better::Lower,
                    paired(&c.disco.vcpu_cpu_ms, &c.bare.vcpu_cpu_ms),
                )
                .headline(),
                Figure::new(
                    &format!("{n}: disco vCPU system time"),
                    "ms",
                    Better::Lower,
                    c.disco.vcpu_system_ms.clone(),
                ),
                Figure::new(
                    &format!("{n}: bare vCPU system time"),
                    "ms",
                    Better::Neither,
                    c.bare.vcpu_system_ms.clone(),
                ),
                Figure::new(
                    &format!("{n}: disco wall"),
                    "ms",
                    Better::Lower,
                    c.disco.wall_ms.clone(),
                ),
                Figure::new(
                    &format!("{n}: disco guest run"),
                    "ms",
                    Better::Lower,
                    c.disco.guest_run_ms.clone(),
                ),
                Figure::new(
                    &format!("{n}: disco create"),
                    "ms",
                    Better::Lower,
                    c.disco.create_ms.clone(),
                ),
            ]);
            if let Some(shmem) = &c.bare_shmem {
                out.extend([
                    Figure::new(
                        &format!("{n}: disco/bare-on-shmem guest run"),
                        "ratio",
                        Better::Lower,
                        paired(&c.disco.guest_run_ms, &shmem.guest_run_ms),
                    )
                    .headline(),
                    Figure::new(
                        &format!("{n}: bare on shmem/bare guest run"),
                        "ratio",
                        Better::Neither,
                        paired(&shmem.guest_run_ms, &c.bare.guest_run_ms),
                    ),
                ]);
            }
            for (side, r) in c.sides() {
                out.extend([
                    Figure::new(
                        &format!("{n}: {side} vCPU time waiting for a CPU"),
                        "ms",
                        Better::Lower,
                        r.vcpu_waiting_ms.clone(),
                    ),
                    Figure::new(
                        &format!("{n}: {side} vCPU time blocked"),
                        "ms",
                        Better::Lower,
                        r.vcpu_blocked_ms.clone(),
                    ),
                ]);
            }
            let d = &c.disco;
            for (name, unit, stats) in [
                ("policy cost / vCPU time", "ratio", &d.policy_cost),
                ("sampled-fault time", "ms", &d.sampling_ms),
                ("of it, zapping", "ms", &d.sampling_zap_ms),
                ("copy-on-write break time", "ms", &d.cow_break_ms),
                ("remap pause time", "ms", &d.paused_ms),
                ("copy-on-write breaks", "breaks", &d.cow_breaks),
            ] {
                if let Some(stats) = stats {
                    out.push(Figure::new(
                        &format!("{n}: {name}"),
                        unit,
                        Better::Lower,
                        stats.clone(),
                    ));
                }
            }
            if let Some(capped) = &d.sampling_capped {
                out.push(Figure::new(
                    &format!("{n}: runs where the sampling cap held the sampler back"),
                    "fraction",
                    Better::Neither,
                    capped.clone(),
                ));
            }
            out.extend([
                Figure::new(
                    &format!("{n}: bare wall"),
                    "ms",
                    Better::Neither,
                    c.bare.wall_ms.clone(),
                ),
                Figure::new(
                    &format!("{n}: bare guest run"),
                    "ms",
                    Better::Neither,
                    c.bare.guest_run_ms.clone(),
                ),
            ]);
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let cats: Vec<String> = self.cases.iter().map(|c| c.case.name.clone()).collect();
        // Medians of paired ratios with their 95 % intervals as whiskers
        // (none where there are too few repetitions or no such side).
        let series = |f: &dyn Fn(&CaseResult) -> Option<Stats>| {
            let stats: Vec<Option<Stats>> = self.cases.iter().map(f).collect();
            (
                stats
                    .iter()
                    .map(|s| s.as_ref().map_or(f64::NAN, |s| s.median))
                    .collect::<Vec<_>>(),
                stats
                    .iter()
                    .map(|s| s.as_ref().and_then(Stats::median_interval_95))
                    .collect::<Vec<_>>(),
            )
        };
        let (guest, guest_ci) =
            series(&|c| Some(paired(&c.disco.guest_run_ms, &c.bare.guest_run_ms)));
        let (over_shmem, over_shmem_ci) = series(&|c| {
            let s = c.bare_shmem.as_ref()?;
            Some(paired(&c.disco.guest_run_ms, &s.guest_run_ms))
        });
        let (shmem, shmem_ci) = series(&|c| {
            let s = c.bare_shmem.as_ref()?;
            Some(paired(&s.guest_run_ms, &c.bare.guest_run_ms))
        });
        let (cpu, cpu_ci) = series(&|c| Some(paired(&c.disco.vcpu_cpu_ms, &c.bare.vcpu_cpu_ms)));
        let mut plot = BarPlot::new(
            "Overhead: paired ratios, median and 95 % interval (bare: anonymous memory)",
            "time / baseline time (bars from 1.0)",
            cats,
        )
        .series("disco / bare", guest, guest_ci);
        if self.cases.iter().any(|c| c.bare_shmem.is_some()) {
            plot = plot
                .series("disco / bare on shmem", over_shmem, over_shmem_ci)
                .series("bare on shmem / bare", shmem, shmem_ci);
        }
        let plot = plot
            .series("vCPU CPU time: disco / bare", cpu, cpu_ci)
            .base(1.0)
            .reference_line(GOAL_STEADY, "goal 1.02 (sweep, random)");
        vec![Plot {
            name: "ratios".into(),
            title: "disco / bare KVM time ratios".into(),
            svg: plot.render(),
        }]
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

    /// 20 paired ratios around `centre`: the 95 % interval of their median
    /// is the 6th to the 15th, `centre - 0.005` to `centre + 0.004`.
    fn ratios(centre: f64) -> Stats {
        Stats::of(
            &(0..20)
                .map(|i| centre + (i as f64 - 10.0) / 1000.0)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_goal_is_met_or_missed_only_when_the_whole_interval_says_so() {
        let met = GoalCheck::of(GOAL_STEADY, &ratios(1.01));
        let (lo, hi) = met.interval_95.expect("20 repetitions give an interval");
        assert!(
            (lo - 1.005).abs() < 1e-9 && (hi - 1.014).abs() < 1e-9,
            "{lo}-{hi}"
        );
        assert_eq!(met.verdict, Verdict::Met);
        assert_eq!(
            GoalCheck::of(GOAL_STEADY, &ratios(1.03)).verdict,
            Verdict::Missed
        );
        // 1.015-1.024 straddles 1.02.
        assert_eq!(
            GoalCheck::of(GOAL_STEADY, &ratios(1.02)).verdict,
            Verdict::Undecided
        );
        // Five repetitions give no interval at all.
        let five = Stats::of(&[1.0; 5]);
        assert_eq!(
            GoalCheck::of(GOAL_STEADY, &five).verdict,
            Verdict::Undecided
        );
    }

    #[test]
    fn fill_cases_have_the_fill_goal() {
        assert_eq!(OverheadCase::fill(4, 1, STATIC).goal, Some(GOAL_FILL));
        assert_eq!(OverheadCase::sweep(4, 1, 2, STATIC).goal, Some(GOAL_STEADY));
        assert_eq!(
            OverheadCase::random_seeded(4, 1, 10, DEFAULT_POLICY, 1).goal,
            Some(GOAL_STEADY)
        );
    }
}
