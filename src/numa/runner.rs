//! The NUMA engine at work inside a run: a thread that, every epoch, gathers
//! access samples, feeds them to the [`PolicyEngine`], answers its questions
//! from the pmap, carries out its decisions through the mapper, and records
//! locality figures over time.
//!
//! Mechanisms: an epoch's `Migrate` decisions go to `Memory::move_pages`,
//! one call per VM and target node (batched: runs of consecutive private
//! frames move with one remap each, shared pages for all their owners),
//! `Replicate` and `Collapse` go to `Memory::replicate_page` and
//! `Memory::collapse_page`; all are safe under running guests.
//!
//! ## Page-fault sampling
//! With the `page-faults` source the runner also decides *which* pages to
//! sample. An epoch is `sample_rounds` rounds; each round it zaps up to
//! `sample_pages` pages of every VM (see `crate::memory::sampler`), then
//! drains the samples their first touches produced:
//! * up to three quarters of the budget re-check pages the previous round
//!   found touched from a node they do not live on (candidates for
//!   migration or replication):
//!   a page touched in every round collects `sample_rounds` samples per
//!   epoch, enough to cross `hot_threshold` within an epoch or two;
//! * the rest are fresh pages chosen uniformly at random (seeded, so a run
//!   is repeatable), in aligned runs of `sample_run_pages` consecutive
//!   pages: they find new hot pages, and, being unbiased, they alone make
//!   the locality figures (a re-check of a remote page would count the
//!   same remote page again and again). Every page has the same chance of
//!   being in a run, so the figures stay unbiased; runs make each zap call,
//!   which costs a KVM invalidation whatever its length, buy several
//!   samples (and a sweeping guest touches a run's pages together, which
//!   is what `migrate_region_pages` moves on).
//!
//! With a replayed trace every sample is used for both.
//!
//! ## Sampling effort steered by miss counters
//! When per-vCPU miss counters are active ([`super::hardware::MissCounters`],
//! hardware events on a host with a PMU), the runner reads them once per
//! epoch and splits the next epoch's per-round budget (`sample_pages` times
//! the number of VMs) by each VM's share of the misses
//! ([`super::hardware::scale_sample_budget`], floor
//! [`super::hardware::budget_floor`]): the VMs that miss most get the most
//! page samples, the total stays the same, none is starved. The counts and
//! budgets per VM and epoch go to [`NumaStats::counters`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::cap::{SamplingCap, VmSamplingCost};
use super::hardware::{budget_floor, scale_sample_budget, EventStatus, MissCounters};
use super::policy::Follow;
use super::{AccessSample, CounterSource, Decision, PageFacts, PageLocation, PolicyEngine};
use crate::config::NumaPolicy;
use crate::memory::sampler::{PageSampler, SamplerStats};
use crate::memory::{Memory, VmId};
use crate::topology::Topology;
use crate::vm::ThreadCpu;

/// Frames a look for memory that follows its VM may examine per frame it
/// wants (`Worker::following_frames`).
const FOLLOW_LOOK_FRAMES: u64 = 16;

/// A VM whose vCPUs were on a CPU for less than this share of an epoch
/// gets no settled verdict from an epoch without samples
/// (`Worker::settled_vms`).
const RAN_SHARE: f64 = 0.5;

/// Locality of one epoch's samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochLocality {
    pub epoch: u64,
    pub ms: f64,
    /// Samples the engine counted this epoch.
    pub samples: u64,
    /// Samples the locality figures come from (unbiased ones, see the
    /// module doc).
    pub locality_samples: u64,
    /// Fraction of those whose page was on the accessing vCPU's node.
    pub local_fraction: f64,
    /// Mean modelled access cost: distance(accessing node, page node) / 10
    /// (1.0 = all local), from the topology's distance matrix.
    pub modelled_cost: f64,
    /// Per VM (monitor space id order): locality samples and local ones.
    pub per_vm: Vec<(u64, u64)>,
    pub migrations: u64,
    pub replicas_made: u64,
}

/// One epoch of counter-steered sampling.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochMisses {
    /// The epoch whose rounds used `budget` (its misses are the previous
    /// epoch's).
    pub epoch: u64,
    /// Per VM (monitor space id order): the steering event's count over the
    /// previous epoch.
    pub misses: Vec<u64>,
    /// Per VM: pages zapped per round this epoch.
    pub budget: Vec<u64>,
    /// Time to read every counter group, in microseconds.
    pub read_us: f64,
}

/// The miss counters that steered sampling effort in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CounterStats {
    /// `hardware` (or `software`, the same code path with software events).
    pub set: String,
    /// The event whose counts steer the budget (the first present one).
    pub steering_event: Option<String>,
    /// Every event of the set: present, or absent with the reason.
    pub events: Vec<EventStatus>,
    /// vCPU threads counted, and those whose counters could not be opened.
    pub threads: usize,
    pub failed_threads: Vec<(u32, String)>,
    /// Floor of the per-round budget of a VM, in pages.
    pub floor: u64,
    /// Per VM, per event of the set: counts over the run.
    pub totals: Vec<Vec<u64>>,
    pub per_epoch: Vec<EpochMisses>,
    /// Median and largest time to read every group once, in microseconds.
    pub read_median_us: f64,
    pub read_max_us: f64,
}

/// What the NUMA engine did in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NumaStats {
    /// The counter source and why it is the one in use.
    pub source: String,
    /// Which counter source is active: `hardware` (miss counters per vCPU
    /// steer the page sampler), `page-faults` or `trace`.
    pub counter_source: String,
    /// Why hardware counters are not active (`None` when they are).
    pub hardware_unused: Option<String>,
    /// Per-VM miss counts and sample budgets per epoch, when counters steer
    /// the sampling effort.
    pub counters: Option<CounterStats>,
    pub epochs: u64,
    pub samples: u64,
    pub migrations: u64,
    pub migration_failures: u64,
    /// Frames that moved along with a migrated page (its region, see
    /// `migrate_region_pages`).
    pub region_migrations: u64,
    /// Frames moved because their VM's memory follows it to its vCPUs'
    /// node (policy rule 9: `PolicyEngine::follow`).
    #[serde(default)]
    pub follow_migrations: u64,
    /// Replicas made by `Replicate` decisions.
    pub replicas_made: u64,
    /// Replicas freed by `Collapse` decisions.
    pub replicas_collapsed: u64,
    pub replication_failures: u64,
    pub freezes: u64,
    /// Per VM (monitor space id order): locality samples and local ones.
    pub per_vm: Vec<(u64, u64)>,
    /// Per VM (monitor space id order): guest frames moved to another
    /// node, the pages decided on and their regions together.
    pub moved_per_vm: Vec<u64>,
    pub series: Vec<EpochLocality>,
    /// The page sampler's own counters, with page-fault sampling.
    pub sampler: Option<SamplerStats>,
    /// The policy's cap on what sampling may cost each VM, a fraction of
    /// its vCPU time, and how each VM's sampling fared under it.
    pub max_sampling_overhead: f64,
    /// What a settled VM's allowance backs off to.
    #[serde(default)]
    pub settled_sampling_overhead: f64,
    pub sampling_cost: Vec<VmSamplingCost>,
}

struct MemoryFacts<'a>(&'a Memory);

impl PageFacts for MemoryFacts<'_> {
    fn location(&self, vm: u32, gfn: u64) -> Option<PageLocation> {
        let loc = self.0.frame_location(vm, gfn)?;
        Some(PageLocation {
            node: loc.page.node(),
            shared_across_vms: loc.shared,
            replicas: if loc.copies.len() > 1 {
                loc.copies
            } else {
                Vec::new()
            },
            group: loc.shared.then_some(loc.group),
        })
    }
}

/// Where samples come from.
pub enum Feed {
    /// A source polled once per epoch (a replayed trace, hardware counters).
    Source(Box<dyn CounterSource>),
    /// The page sampler; the runner zaps pages itself every round.
    Sampler(Arc<PageSampler>),
}

impl Feed {
    fn describe(&self) -> String {
        match self {
            Feed::Source(s) => s.describe(),
            Feed::Sampler(s) => s.describe(),
        }
    }
}

/// A small seeded generator (xorshift64*): repeatable page choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The page-choosing half of page-fault sampling.
struct ZapPlan {
    sampler: Arc<PageSampler>,
    rng: Rng,
    /// Pages to re-check next round (touched from a remote node, or
    /// replicated).
    recheck: BTreeSet<(VmId, u64)>,
    /// Fresh random pages zapped this epoch: their samples are unbiased.
    explored: HashSet<(VmId, u64)>,
    /// How many pages each VM may zap (see `numa::cap`).
    cap: SamplingCap,
}

impl ZapPlan {
    /// `budget`: pages per VM (index = VM id) when counters steer the
    /// effort, else `pages_per_vm` for every VM.
    /// Fresh pages come as aligned runs of `run_pages` (see
    /// `NumaPolicy::sample_run_pages`).
    fn round(
        &mut self,
        memory: &Memory,
        pages_per_vm: u64,
        run_pages: u64,
        budget: Option<&[u64]>,
    ) {
        let spaces = memory.spaces();
        let vms: Vec<VmId> = spaces.iter().map(|s| s.0).collect();
        self.cap.begin_round(&self.sampler, &vms);
        for (vm, frames, _) in spaces {
            // Pages whose sample came go back to write-protect mode alone.
            if let Err(e) = memory.disarm_sampled(vm) {
                tracing::warn!("disarming sampled pages of vm {vm}: {e:#}");
            }
            // A VM whose vCPUs have exited (or that is paused) would never
            // touch what is zapped: no sample, only the zap's cost.
            if memory.guest_still(vm) {
                continue;
            }
            let asked = budget
                .and_then(|b| b.get(vm as usize).copied())
                .unwrap_or(pages_per_vm);
            let pages_per_vm = self.cap.allow(vm, asked);
            if pages_per_vm == 0 {
                continue;
            }
            let cpu_before = ThreadCpu::clock();
            let rechecks: Vec<u64> = self
                .recheck
                .range((vm, 0)..=(vm, u64::MAX))
                .map(|&(_, g)| g)
                .take((pages_per_vm * 3 / 4) as usize)
                .collect();
            let fresh = pages_per_vm - rechecks.len() as u64;
            let mut gfns = rechecks;
            // Whole runs only: an allowance too small for one is left in
            // the VM's bucket, which grows until a later round can afford
            // a run (re-checks, which make pages hot, go first meanwhile).
            let run = run_pages.clamp(1, frames.max(1));
            let runs = fresh / run;
            for _ in 0..runs {
                let first = self.rng.below(frames.div_ceil(run)) * run;
                for gfn in first..(first + run).min(frames) {
                    self.explored.insert((vm, gfn));
                    gfns.push(gfn);
                }
            }
            let zapped = match memory.zap_frames(vm, &gfns) {
                Ok(n) => n as u64,
                Err(e) => {
                    tracing::debug!("zapping pages of vm {vm}: {e:#}");
                    0
                }
            };
            self.cap
                .zapped(vm, zapped, ThreadCpu::clock().saturating_sub(cpu_before));
        }
        self.recheck.clear();
    }
}

pub struct NumaRunner {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<NumaStats>>,
    thread: Option<JoinHandle<()>>,
    sampler: Option<Arc<PageSampler>>,
    steer: Option<Arc<MissCounters>>,
}

impl NumaRunner {
    /// Starts the `disco-numa` thread. `steer`: per-vCPU miss counters
    /// whose per-VM shares split the page-sampling budget (used with the
    /// page sampler only); `why` says how the source was chosen, and, when
    /// `steer` is `None`, why hardware counters are not in use.
    pub fn start(
        memory: Arc<Memory>,
        topology: &Topology,
        policy: NumaPolicy,
        feed: Feed,
        why: &str,
        vms: usize,
        steer: Option<Arc<MissCounters>>,
    ) -> std::io::Result<NumaRunner> {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = match &feed {
            Feed::Sampler(s) => Some(s.clone()),
            Feed::Source(_) => None,
        };
        // Counters steer the page sampler; with another feed they are idle.
        let steer = steer.filter(|_| sampler.is_some());
        let (counter_source, hardware_unused) = match (&steer, &feed) {
            (Some(c), _) => (c.event_set().kind.to_string(), None),
            (None, Feed::Sampler(_)) => ("page-faults".to_string(), Some(why.to_string())),
            (None, Feed::Source(s)) => (s.name().to_string(), Some(why.to_string())),
        };
        let stats = Arc::new(Mutex::new(NumaStats {
            source: format!("{} [{why}]", feed.describe()),
            counter_source,
            hardware_unused,
            counters: steer.as_ref().map(|c| CounterStats {
                set: c.event_set().kind.to_string(),
                floor: budget_floor(policy.sample_pages),
                totals: vec![vec![0; c.event_set().events.len()]; vms],
                ..CounterStats::default()
            }),
            per_vm: vec![(0, 0); vms],
            max_sampling_overhead: policy.max_sampling_overhead,
            settled_sampling_overhead: policy.settled_sampling_overhead,
            ..NumaStats::default()
        }));
        let distances = topology.distances.clone();
        let nodes = topology.node_count();
        let (flag, out, counters) = (stop.clone(), stats.clone(), steer.clone());
        let thread = std::thread::Builder::new()
            .name("disco-numa".into())
            .spawn(move || {
                let mut worker = Worker {
                    memory,
                    distances,
                    engine: PolicyEngine::new(policy.clone(), nodes),
                    out,
                    vms,
                    steer: counters,
                    read_us: Vec::new(),
                    regions: matches!(feed, Feed::Sampler(_)),
                    follow_cursor: HashMap::new(),
                    vcpu_on_cpu: HashMap::new(),
                };
                worker.run(policy, feed, &flag);
            })?;
        Ok(NumaRunner {
            stop,
            stats,
            thread: Some(thread),
            sampler,
            steer,
        })
    }

    pub fn stats(&self) -> NumaStats {
        let mut s = self.stats.lock().clone();
        s.sampler = self.sampler.as_ref().map(|p| p.stats());
        if let (Some(c), Some(out)) = (&self.steer, s.counters.as_mut()) {
            out.events = c.status();
            out.steering_event = c.steering_event().map(|i| out.events[i].name.clone());
            out.threads = c.threads();
            out.failed_threads = c.failed_threads();
        }
        s
    }

    pub fn stop(mut self) -> NumaStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NumaRunner {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Worker {
    memory: Arc<Memory>,
    distances: Vec<Vec<u32>>,
    engine: PolicyEngine,
    out: Arc<Mutex<NumaStats>>,
    vms: usize,
    steer: Option<Arc<MissCounters>>,
    /// Every epoch's counter read time, for the median.
    read_us: Vec<f64>,
    /// Migrating pages take their regions along, and VMs' memory follows
    /// them (policy rule 9) (page-fault sampling only: a replayed trace
    /// names every page it means).
    regions: bool,
    /// Per VM whose memory follows it: the frame its next look starts at.
    follow_cursor: HashMap<VmId, u64>,
    /// Per VM, its vCPU threads' time on a CPU at the last epoch's end.
    vcpu_on_cpu: HashMap<VmId, Duration>,
}

impl Worker {
    /// Per-VM figures are indexed by `VmId`: as many slots as the VMs the
    /// runner was started for, or more once VMs are added while it runs
    /// (a monitor that takes VMs in and out).
    fn vm_slots(&self) -> usize {
        let highest = self.memory.spaces().iter().map(|s| s.0 as usize + 1).max();
        self.vms.max(highest.unwrap_or(0))
    }

    /// With miss counters: reads them (the last epoch's deltas), records
    /// them, and returns this epoch's per-round budget per VM, scaled by
    /// each VM's share of the misses. `None`: `sample_pages` for every VM.
    fn steered_budget(&mut self, sample_pages: u64) -> Option<Vec<u64>> {
        let counters = self.steer.as_ref()?;
        let counts = counters.read_epoch(self.vm_slots());
        let budget = scale_sample_budget(
            &counts.misses_per_vm,
            sample_pages,
            budget_floor(sample_pages),
        );
        self.read_us.push(counts.read_us);
        let mut sorted = self.read_us.clone();
        sorted.sort_by(f64::total_cmp);
        let mut s = self.out.lock();
        let epoch = s.epochs + 1;
        if let Some(c) = s.counters.as_mut() {
            if c.totals.len() < counts.per_vm_events.len() {
                let events = counts.per_vm_events.first().map_or(0, Vec::len);
                c.totals.resize(counts.per_vm_events.len(), vec![0; events]);
            }
            for (total, vm) in c.totals.iter_mut().zip(&counts.per_vm_events) {
                for (t, v) in total.iter_mut().zip(vm) {
                    *t = t.saturating_add(*v);
                }
            }
            c.read_median_us = sorted[sorted.len() / 2];
            c.read_max_us = sorted[sorted.len() - 1];
            c.per_epoch.push(EpochMisses {
                epoch,
                misses: counts.misses_per_vm,
                budget: budget.clone(),
                read_us: counts.read_us,
            });
        }
        Some(budget)
    }

    fn run(&mut self, policy: NumaPolicy, mut feed: Feed, stop: &AtomicBool) {
        let epoch = Duration::from_millis(policy.epoch_ms);
        let rounds = match feed {
            Feed::Sampler(_) => policy.sample_rounds.max(1) as u32,
            Feed::Source(_) => 1,
        };
        let mut plan = match &feed {
            Feed::Sampler(s) => Some(ZapPlan {
                sampler: s.clone(),
                rng: Rng(0x5eed_d15c_0000_0001),
                recheck: BTreeSet::new(),
                explored: HashSet::new(),
                cap: SamplingCap::new(
                    policy.max_sampling_overhead,
                    policy.settled_sampling_overhead,
                    policy.sample_fault_cost_us,
                    epoch,
                    rounds as usize,
                ),
            }),
            Feed::Source(_) => None,
        };
        let started = Instant::now();
        let mut samples: Vec<AccessSample> = Vec::new();
        let mut round_samples: Vec<AccessSample> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let tick = Instant::now();
            samples.clear();
            let budget = match plan {
                Some(_) => self.steered_budget(policy.sample_pages),
                None => None,
            };
            for round in 0..rounds {
                if let Some(plan) = plan.as_mut() {
                    plan.round(
                        &self.memory,
                        policy.sample_pages,
                        policy.sample_run_pages,
                        budget.as_deref(),
                    );
                }
                let until = tick + epoch * (round + 1) / rounds;
                let now = Instant::now();
                if until > now {
                    std::thread::sleep(until - now);
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                round_samples.clear();
                match (&mut feed, plan.as_mut()) {
                    (Feed::Sampler(_), Some(plan)) => {
                        plan.sampler.drain(&mut round_samples);
                        // Re-check pages touched from a remote node (to see
                        // whether they should move) and replicated pages (a
                        // replica's reader must keep showing up, or the
                        // engine would think it stopped reading, collapse
                        // the replica, make it again and freeze the page).
                        for s in &round_samples {
                            let recheck = self
                                .memory
                                .frame_location(s.vm, s.gfn)
                                .is_some_and(|l| l.page.node() != s.node || l.copies.len() > 1);
                            if recheck {
                                plan.recheck.insert((s.vm, s.gfn));
                            }
                        }
                    }
                    (Feed::Source(source), _) => {
                        if let Err(e) = source.poll(&mut round_samples) {
                            tracing::warn!("NUMA counter source: {e:#}");
                        }
                    }
                    _ => {}
                }
                samples.extend_from_slice(&round_samples);
            }
            let unbiased: Vec<AccessSample> = match plan.as_mut() {
                Some(plan) => {
                    let explored = std::mem::take(&mut plan.explored);
                    let mut seen = HashSet::new();
                    samples
                        .iter()
                        .filter(|s| explored.contains(&(s.vm, s.gfn)) && seen.insert((s.vm, s.gfn)))
                        .copied()
                        .collect()
                }
                None => samples.clone(),
            };
            let mut point = self.locality(&unbiased);
            point.ms = started.elapsed().as_secs_f64() * 1e3;
            point.samples = samples.len() as u64;
            self.engine.observe(&samples);
            let decisions = self.engine.decide(&MemoryFacts(&self.memory));
            if let Some(plan) = plan.as_mut() {
                for (vm, settled) in self.settled_vms(&samples, &decisions, plan) {
                    plan.cap.end_epoch(vm, settled);
                }
            }
            self.apply(decisions, point);
            if let Some(plan) = &plan {
                self.out.lock().sampling_cost = plan.cap.report();
            }
        }
    }

    /// Whether each VM was settled this epoch, so that its sampling backs
    /// off (`numa::cap`, "Backing off"): the engine decided no migration
    /// or replication for it, and of the pages its samples named, at most
    /// a tenth were used from a node other than theirs
    /// while the engine could still move them (not frozen, not
    /// write-shared, not excluded). Under a policy that only replicates, a
    /// private remote page counts too: it may be merged and shared later,
    /// and backing off before that starved replication (bench_suite).
    /// A run that only measures locality never settles.
    /// Re-checks count: a page the engine is still watching
    /// keeps its VM unsettled, and so does memory following its VM (rule 9).
    /// A VM with no samples is settled (an idle guest should not pay to be
    /// watched), unless its vCPUs hardly ran while pages zapped for it are
    /// still to be touched: no verdict then (`None`). One whose vCPUs move
    /// finds its samples remote in the next epoch, and is back at the full
    /// rate.
    fn settled_vms(
        &mut self,
        samples: &[AccessSample],
        decisions: &[Decision],
        plan: &ZapPlan,
    ) -> Vec<(VmId, Option<bool>)> {
        let ran = self.vcpus_ran(&plan.sampler);
        // With neither migration nor replication on, the engine runs only
        // to measure locality (an explicit `sampling` under `static`): the
        // samples are then the product, and nothing backs off.
        let params = self.engine.params();
        let measuring = !params.migrate && !params.replicate;
        let mut pages: BTreeMap<VmId, (HashSet<u64>, HashSet<u64>)> = self
            .memory
            .spaces()
            .iter()
            .map(|s| (s.0, Default::default()))
            .collect();
        for s in samples {
            let Some((named, remote)) = pages.get_mut(&s.vm) else {
                continue;
            };
            named.insert(s.gfn);
            let elsewhere = self
                .memory
                .frame_location(s.vm, s.gfn)
                .is_some_and(|l| l.page.node() != s.node && !l.excluded);
            if elsewhere && !self.engine.leaves_alone(s.vm, s.gfn) {
                remote.insert(s.gfn);
            }
        }
        let acted: HashSet<VmId> = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Migrate { .. } | Decision::Replicate { .. }))
            .map(|d| d.page().0)
            .chain(self.engine.follow().iter().map(|f| f.vm))
            .collect();
        pages
            .into_iter()
            .map(|(vm, (named, remote))| {
                let hardly_ran = !ran.get(&vm).copied().unwrap_or(true);
                if named.is_empty()
                    && !acted.contains(&vm)
                    && plan.cap.outstanding(vm) > 0
                    && hardly_ran
                {
                    // No sample yet, pages zapped in the last epoch still
                    // to be touched, and its vCPUs hardly ran: a guest
                    // sharing its host CPU with many others. No verdict
                    // (settling on it starved 16 guests on two host CPUs
                    // of every sample). A guest that ran and touched none
                    // of them is settled, as an idle one is.
                    return (vm, None);
                }
                // One remote page is enough when few were sampled: a
                // lenient rule here lets a VM at the floor stay there.
                let busy = !remote.is_empty() && remote.len() * 10 > named.len();
                (vm, Some(!measuring && !acted.contains(&vm) && !busy))
            })
            .collect()
    }

    /// Per VM, whether its vCPUs were on a CPU for at least
    /// [`RAN_SHARE`] of the last epoch (one vCPU's worth counts per vCPU),
    /// from their scheduler statistics; VMs whose statistics cannot be
    /// read count as having run.
    fn vcpus_ran(&mut self, sampler: &PageSampler) -> HashMap<VmId, bool> {
        let epoch = Duration::from_millis(self.engine.params().epoch_ms);
        let spaces = self.memory.spaces();
        // VMs that left (a monitor that lives takes VMs in and out).
        self.vcpu_on_cpu
            .retain(|vm, _| spaces.iter().any(|s| s.0 == *vm));
        self.follow_cursor
            .retain(|vm, _| spaces.iter().any(|s| s.0 == *vm));
        let mut out = HashMap::new();
        for (vm, _, _) in spaces {
            let tids = sampler.vcpu_tids(vm);
            let times: Option<Vec<Duration>> =
                tids.iter().map(|&t| crate::vm::thread_on_cpu(t)).collect();
            let Some(times) = times.filter(|t| !t.is_empty()) else {
                continue;
            };
            let now: Duration = times.iter().sum();
            if let Some(before) = self.vcpu_on_cpu.insert(vm, now) {
                let wanted = epoch.mul_f64(RAN_SHARE * tids.len() as f64);
                out.insert(vm, now.saturating_sub(before) >= wanted);
            }
        }
        out
    }

    /// Locality figures of `samples`, against where their pages are now.
    fn locality(&self, samples: &[AccessSample]) -> EpochLocality {
        let mut point = EpochLocality {
            per_vm: vec![(0, 0); self.vm_slots()],
            ..EpochLocality::default()
        };
        let (mut local, mut cost, mut counted) = (0u64, 0f64, 0u64);
        for s in samples {
            let Some(loc) = self.memory.frame_location(s.vm, s.gfn) else {
                continue;
            };
            let node = loc.page.node();
            let is_local = node == s.node;
            counted += 1;
            local += is_local as u64;
            let d = self
                .distances
                .get(s.node)
                .and_then(|row| row.get(node))
                .copied()
                .unwrap_or(10);
            cost += d as f64 / 10.0;
            if let Some(v) = point.per_vm.get_mut(s.vm as usize) {
                v.0 += 1;
                v.1 += is_local as u64;
            }
        }
        point.locality_samples = counted;
        if counted > 0 {
            point.local_fraction = local as f64 / counted as f64;
            point.modelled_cost = cost / counted as f64;
        }
        point
    }

    /// Carries out `Migrate` decisions with one `Memory::move_pages` call
    /// per VM and target node (runs of consecutive frames move with one
    /// remap each), each page with its region (see [`Self::region_of`]),
    /// and moves the memory that follows its VM (policy rule 9) with the
    /// copy budget left; returns (migrations, failures), one per decision,
    /// the frames that moved along with them, the frames that followed
    /// their VM, and the frames moved per VM.
    fn migrate(&mut self, decisions: &[Decision]) -> (u64, u64, u64, u64, Vec<(VmId, u64)>) {
        let params = self.engine.params();
        let mut spare = params
            .copy_budget_pages
            .saturating_sub(decisions.iter().map(|d| d.copies() as u64).sum());
        let region = if self.regions {
            params.migrate_region_pages
        } else {
            1
        };
        let mut groups: BTreeMap<(VmId, usize), Vec<u64>> = BTreeMap::new();
        // The pages the engine decided on: they count as migrations, the
        // region frames that go along are counted apart.
        let mut decided: HashSet<(VmId, u64)> = HashSet::new();
        for d in decisions {
            if let Decision::Migrate { vm, gfn, to } = *d {
                groups.entry((vm, to)).or_default().push(gfn);
                decided.insert((vm, gfn));
            }
        }
        let mut moving = decided.clone();
        let mut along = 0;
        for d in decisions {
            if let Decision::Migrate { vm, gfn, to } = *d {
                for g in self.region_of(vm, gfn, to, region, spare) {
                    if moving.insert((vm, g)) {
                        groups.entry((vm, to)).or_default().push(g);
                        spare -= 1;
                        along += 1;
                    }
                }
            }
        }
        // Rule 9: what the budget has left goes to VMs whose memory
        // follows them, shared out evenly.
        let follow = if self.regions {
            self.engine.follow().to_vec()
        } else {
            Vec::new()
        };
        let mut followed = 0;
        if !follow.is_empty() {
            tracing::debug!("memory follows {follow:?} with {spare} pages of the copy budget left");
        }
        for (i, f) in follow.iter().enumerate() {
            let share = spare / (follow.len() - i) as u64;
            for g in self.following_frames(*f, share, &moving) {
                moving.insert((f.vm, g));
                groups.entry((f.vm, f.to)).or_default().push(g);
                spare -= 1;
                followed += 1;
            }
        }
        let (mut moved, mut failed) = (0, 0);
        let mut per_vm = Vec::new();
        for ((vm, to), gfns) in groups {
            match self.memory.move_pages(vm, &gfns, to) {
                Ok(report) => {
                    per_vm.push((vm, report.moved.len() as u64));
                    let done: HashSet<u64> = report.moved.iter().copied().collect();
                    let there: HashSet<u64> = report.unchanged.iter().copied().collect();
                    for gfn in gfns.into_iter().filter(|&g| decided.contains(&(vm, g))) {
                        if done.contains(&gfn) {
                            moved += 1;
                        } else if !there.contains(&gfn) {
                            failed += 1;
                        }
                    }
                    for (gfn, why) in &report.failed {
                        tracing::debug!("migrating vm {vm} frame {gfn:#x} to node {to}: {why}");
                    }
                }
                Err(e) => {
                    failed += gfns.len() as u64;
                    tracing::debug!("migrating {} frames of vm {vm}: {e:#}", gfns.len());
                }
            }
        }
        (moved, failed, along, followed, per_vm)
    }

    /// Up to `most` frames of VM `f.vm` that follow it from node `f.from`
    /// (rule 9): private, not excluded, left to the engine, not `moving`
    /// already. The look walks the guest range in order from where the
    /// last one stopped, so that the frames come in runs and every frame
    /// is reached, and looks at no more than [`FOLLOW_LOOK_FRAMES`] per
    /// page wanted (a VM with few frames left on `from` costs the monitor
    /// a bounded look per epoch).
    fn following_frames(
        &mut self,
        f: Follow,
        most: u64,
        moving: &HashSet<(VmId, u64)>,
    ) -> Vec<u64> {
        let Some(frames) = self
            .memory
            .spaces()
            .iter()
            .find(|s| s.0 == f.vm)
            .map(|s| s.1)
        else {
            return Vec::new();
        };
        if most == 0 || frames == 0 {
            return Vec::new();
        }
        let cursor = self.follow_cursor.entry(f.vm).or_insert(0);
        let mut out = Vec::new();
        let look = (most * FOLLOW_LOOK_FRAMES).min(frames);
        for i in 0..look {
            let g = (*cursor + i) % frames;
            let follows = !moving.contains(&(f.vm, g))
                && !self.engine.leaves_alone(f.vm, g)
                && self
                    .memory
                    .frame_location(f.vm, g)
                    .is_some_and(|l| !l.shared && !l.excluded && l.page.node() == f.from);
            if follows {
                out.push(g);
                if out.len() as u64 == most {
                    *cursor = (g + 1) % frames;
                    return out;
                }
            }
        }
        *cursor = (*cursor + look) % frames;
        out
    }

    /// The frames that move along with frame `gfn` of `vm` going to node
    /// `to`: the other frames of its aligned region of `region` frames that
    /// are private and on the node `gfn` leaves, at most `spare` of them.
    ///
    /// Why: sampling is capped (`numa::cap`), so a VM gets a few hundred
    /// samples a second on the build hosts (docs/host-facts.md), and a
    /// 256 MiB guest has 65,536
    /// pages. A page the samples show used from another node says the same
    /// of its neighbours far more often than not (guest memory is used in
    /// runs: arrays, heaps, page-cache files); moving its region in one
    /// batch also moves in runs, which the mapper does at close to memcpy
    /// speed. Shared and replicated frames, and frames on other nodes, stay
    /// where the engine put them; a neighbour that was in fact used from
    /// elsewhere shows up remote in later samples and is decided on its
    /// own, under the engine's ping-pong guard.
    fn region_of(&self, vm: VmId, gfn: u64, to: usize, region: u64, spare: u64) -> Vec<u64> {
        if region <= 1 || spare == 0 {
            return Vec::new();
        }
        let Some(from) = self.memory.frame_location(vm, gfn).map(|l| l.page.node()) else {
            return Vec::new();
        };
        if from == to {
            return Vec::new();
        }
        let start = gfn - gfn % region;
        (start..start + region)
            .filter(|&g| g != gfn)
            .filter(|&g| {
                self.memory
                    .frame_location(vm, g)
                    .is_some_and(|l| !l.shared && !l.excluded && l.page.node() == from)
            })
            .take(spare as usize)
            .collect()
    }

    fn apply(&mut self, decisions: Vec<Decision>, mut point: EpochLocality) {
        let (moved, failed, along, followed, per_vm) = self.migrate(&decisions);
        let out = self.out.clone();
        let mut s = out.lock();
        for (vm, frames) in per_vm {
            let vm = vm as usize;
            if s.moved_per_vm.len() <= vm {
                s.moved_per_vm.resize(vm + 1, 0);
            }
            s.moved_per_vm[vm] += frames;
        }
        s.migrations += moved;
        s.region_migrations += along;
        s.follow_migrations += followed;
        s.migration_failures += failed;
        point.migrations += moved;
        for d in decisions {
            match d {
                // Carried out above, batched.
                Decision::Migrate { .. } => {}
                Decision::Replicate { vm, gfn, nodes } => {
                    match self.memory.replicate_page(vm, gfn, &nodes) {
                        Ok(made) => {
                            s.replicas_made += made as u64;
                            point.replicas_made += made as u64;
                        }
                        Err(e) => {
                            s.replication_failures += 1;
                            tracing::debug!("replicating vm {vm} frame {gfn:#x}: {e:#}");
                        }
                    }
                }
                Decision::Collapse { vm, gfn, keep } => {
                    match self.memory.collapse_page(vm, gfn, &keep) {
                        Ok(dropped) => s.replicas_collapsed += dropped as u64,
                        Err(e) => {
                            s.replication_failures += 1;
                            tracing::debug!("collapsing vm {vm} frame {gfn:#x}: {e:#}");
                        }
                    }
                }
                Decision::Freeze { .. } => s.freezes += 1,
            }
        }
        s.epochs += 1;
        s.samples += point.samples;
        if s.per_vm.len() < point.per_vm.len() {
            s.per_vm.resize(point.per_vm.len(), (0, 0));
        }
        for (total, p) in s.per_vm.iter_mut().zip(&point.per_vm) {
            total.0 += p.0;
            total.1 += p.1;
        }
        point.epoch = s.epochs;
        s.series.push(point);
    }
}
