//! The sampling cost cap: page-fault sampling may cost each VM at most
//! `max_sampling_overhead` of its vCPU time, whatever `epoch_ms`,
//! `sample_pages` and `sample_rounds` ask for.
//!
//! ## What a sample costs
//! A sampled page costs the guest when it is touched: the vCPU faults,
//! waits for the fault handler, and is woken. The handler's own time is
//! measured per fault (`PageSampler::vm_faults`); the rest (the exit from
//! the guest, the kernel's fault path, waking the handler thread and then
//! the vCPU) cannot be timed from the monitor, and is charged as a constant,
//! `sample_fault_cost_us`. On the build hosts (docs/host-facts.md,
//! "userfaultfd") the whole
//! cost was measured from the vCPU threads' own scheduler statistics
//! (`/proc/self/task/TID/schedstat`: time on CPU plus time blocked, against
//! a run without sampling): a 64 MiB, 2-vCPU sweep with 45,066 samples
//! spent about 98 us of vCPU time per sample, of which the handler was
//! 4-15 us; hence the default of 90 us. Zapped pages that are never touched
//! cost the guest little and are not charged.
//!
//! ## The budget
//! Each VM has a bucket of vCPU time: every round adds
//! `max_sampling_overhead x round length x its vCPUs` and takes what the
//! faults since the last round cost. A round zaps at most as many pages as
//! the bucket pays for, counting every page zapped in the last epoch and
//! not touched yet as a fault still to come (a guest that has not touched
//! its sampled pages yet may touch them all at once: counting on a low
//! touch rate let a sweep guest run up 17x its allowance); an empty bucket
//! zaps none. Pages still untouched an epoch after their zap are written
//! off. The bucket holds at most one epoch's allowance, so a VM idle for a
//! while cannot save up for a burst. Which pages are
//! zapped (re-checks first, then fresh random ones) is the runner's choice;
//! the cap only says how many.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::sampler::PageSampler;
use crate::memory::VmId;

/// One VM's sampling under the cap, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmSamplingCost {
    pub vm: VmId,
    /// Pages zapped, and minor faults (touches) they caused.
    pub zapped: u64,
    pub faults: u64,
    /// vCPU time charged for those faults (handler time measured, plus
    /// `sample_fault_cost_us` each), in milliseconds.
    pub charged_ms: f64,
    /// Rounds, and rounds in which the cap zapped fewer pages than asked.
    pub rounds: u64,
    pub capped_rounds: u64,
    /// Pages asked for and allowed over the run.
    pub pages_asked: u64,
    pub pages_allowed: u64,
}

#[derive(Default)]
struct Bucket {
    /// vCPU time the VM may still spend on sampled faults, nanoseconds.
    tokens_ns: f64,
    /// The sampler's counters at the last round.
    faults: u64,
    handler_ns: u64,
    /// Per round of the last epoch: pages zapped, and faults seen since.
    window: VecDeque<(u64, u64)>,
    report: VmSamplingCost,
}

impl Bucket {
    /// Pages zapped in the last epoch that have not faulted yet.
    fn outstanding(&self) -> u64 {
        let (zapped, faults) = self
            .window
            .iter()
            .fold((0, 0), |(z, f), &(rz, rf)| (z + rz, f + rf));
        zapped.saturating_sub(faults)
    }
}

/// The per-VM buckets of one NUMA runner.
pub struct SamplingCap {
    overhead: f64,
    fault_cost_ns: f64,
    epoch: Duration,
    rounds_per_epoch: usize,
    last: Instant,
    buckets: BTreeMap<VmId, Bucket>,
}

impl SamplingCap {
    pub fn new(
        max_overhead: f64,
        fault_cost_us: f64,
        epoch: Duration,
        rounds_per_epoch: usize,
    ) -> SamplingCap {
        SamplingCap {
            overhead: max_overhead,
            fault_cost_ns: fault_cost_us * 1e3,
            epoch,
            rounds_per_epoch: rounds_per_epoch.max(1),
            last: Instant::now(),
            buckets: BTreeMap::new(),
        }
    }

    /// Starts a round: charges every VM's faults since the last round and
    /// credits its allowance for the time that passed.
    pub fn begin_round(&mut self, sampler: &PageSampler, vms: &[VmId]) {
        let now = Instant::now();
        let dt_ns = (now - self.last).as_nanos() as f64;
        self.last = now;
        for &vm in vms {
            let vcpus = sampler.vcpu_threads(vm).max(1) as f64;
            let (faults, handler_ns) = sampler.vm_faults(vm);
            let ceiling = self.overhead * self.epoch.as_nanos() as f64 * vcpus;
            let b = self.buckets.entry(vm).or_insert_with(|| Bucket {
                // One epoch's allowance to start with.
                tokens_ns: ceiling,
                report: VmSamplingCost {
                    vm,
                    ..VmSamplingCost::default()
                },
                ..Bucket::default()
            });
            let new_faults = faults.saturating_sub(b.faults);
            let cost = new_faults as f64 * self.fault_cost_ns
                + handler_ns.saturating_sub(b.handler_ns) as f64;
            b.faults = faults;
            b.handler_ns = handler_ns;
            b.report.faults += new_faults;
            b.report.charged_ms += cost / 1e6;
            // Faults are matched to the oldest zaps still outstanding.
            let mut left = new_faults;
            for (zapped, faulted) in b.window.iter_mut() {
                let take = left.min(zapped.saturating_sub(*faulted));
                *faulted += take;
                left -= take;
            }
            // This round's entry; zaps older than an epoch are written off.
            b.window.push_back((0, 0));
            while b.window.len() > self.rounds_per_epoch {
                b.window.pop_front();
            }
            b.tokens_ns = (b.tokens_ns + self.overhead * dt_ns * vcpus - cost).min(ceiling);
        }
    }

    /// How many of the `asked` pages VM `vm` may zap this round.
    pub fn allow(&mut self, vm: VmId, asked: u64) -> u64 {
        let Some(b) = self.buckets.get_mut(&vm) else {
            return asked;
        };
        let free = b.tokens_ns - b.outstanding() as f64 * self.fault_cost_ns;
        let affordable = if free <= 0.0 {
            0
        } else {
            (free / self.fault_cost_ns).floor() as u64
        };
        let allowed = asked.min(affordable);
        b.report.rounds += 1;
        b.report.pages_asked += asked;
        b.report.pages_allowed += allowed;
        if allowed < asked {
            b.report.capped_rounds += 1;
        }
        allowed
    }

    /// Records how many pages VM `vm` really zapped this round.
    pub fn zapped(&mut self, vm: VmId, pages: u64) {
        if let Some(b) = self.buckets.get_mut(&vm) {
            if let Some(round) = b.window.back_mut() {
                round.0 += pages;
            }
            b.report.zapped += pages;
        }
    }

    /// Every VM's figures so far.
    pub fn report(&self) -> Vec<VmSamplingCost> {
        self.buckets.values().map(|b| b.report.clone()).collect()
    }
}
