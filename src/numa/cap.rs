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
//! The monitor's own work for a VM's samples is charged too, as measured,
//! while the host has no idle CPU (`crate::host_load`): the `disco-numa`
//! thread's CPU time choosing and zapping its pages (each `madvise` also
//! makes KVM drop the pages from the VM's page tables). On a host with no
//! idle CPU that time is taken from the vCPUs; with one idle it is not. On
//! the 2-core build host, with a 2-vCPU guest on the 2-socket fixture, the
//! vCPUs waited 40-50 ms more for a CPU than on bare KVM against 19 ms
//! with one node (no sampling), while the charge without the zapping was
//! 24 ms in all (README, "Overhead"). The allowance per page counts the
//! zap's measured cost per page along with the fault's.
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

use crate::host_load::HostLoad;
use crate::memory::sampler::PageSampler;
use crate::memory::VmId;
use crate::vm::ThreadCpu;

/// One VM's sampling under the cap, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmSamplingCost {
    pub vm: VmId,
    /// Pages zapped, and minor faults (touches) they caused.
    pub zapped: u64,
    pub faults: u64,
    /// vCPU time charged for those faults (handler time measured, plus
    /// `sample_fault_cost_us` each) and for zapping, in milliseconds.
    pub charged_ms: f64,
    /// The monitor's CPU time choosing and zapping the VM's pages, and
    /// the part of it charged (that spent while no host CPU was idle).
    #[serde(default)]
    pub zap_ms: f64,
    #[serde(default)]
    pub zap_charged_ms: f64,
    /// Rounds, and rounds in which the cap zapped fewer pages than asked.
    pub rounds: u64,
    pub capped_rounds: u64,
    /// Pages asked for and allowed over the run.
    pub pages_asked: u64,
    pub pages_allowed: u64,
    /// Epochs judged, and those in which the VM was settled (its allowance
    /// backed off towards `settled_sampling_overhead`).
    #[serde(default)]
    pub epochs: u64,
    #[serde(default)]
    pub settled_epochs: u64,
    /// The allowance in force now, a fraction of the VM's vCPU time (set
    /// by `SamplingCap::report` from the bucket).
    #[serde(default)]
    pub overhead_now: f64,
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
    /// The allowance in force, a fraction of vCPU time: between the
    /// settled floor and the cap (see "Backing off" above).
    overhead: f64,
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

/// One VM's sampler counters at the start of a round: its vCPUs, and its
/// sampled faults and their handler time so far.
struct VmFaultCounts {
    vm: VmId,
    vcpus: usize,
    faults: u64,
    handler_ns: u64,
}

/// The per-VM buckets of one NUMA runner.
pub struct SamplingCap {
    overhead: f64,
    /// The allowance of a VM that has been settled for a few epochs.
    settled_overhead: f64,
    fault_cost_ns: f64,
    /// The monitor's CPU time per zapped page, a running mean.
    zap_ns_per_page: f64,
    /// Whether the host has a CPU to spare (zapping is charged when not).
    load: HostLoad,
    epoch: Duration,
    rounds_per_epoch: usize,
    last: Instant,
    buckets: BTreeMap<VmId, Bucket>,
}

impl SamplingCap {
    pub fn new(
        max_overhead: f64,
        settled_overhead: f64,
        fault_cost_us: f64,
        epoch: Duration,
        rounds_per_epoch: usize,
    ) -> SamplingCap {
        SamplingCap {
            overhead: max_overhead,
            settled_overhead: settled_overhead.min(max_overhead),
            fault_cost_ns: fault_cost_us * 1e3,
            zap_ns_per_page: 0.0,
            load: HostLoad::new(ThreadCpu::clock().as_secs_f64() * 1e3),
            epoch,
            rounds_per_epoch: rounds_per_epoch.max(1),
            last: Instant::now(),
            buckets: BTreeMap::new(),
        }
    }

    /// Starts a round: charges every VM's faults since the last round and
    /// credits its allowance for the time that passed.
    pub fn begin_round(&mut self, sampler: &PageSampler, vms: &[VmId]) {
        let counts: Vec<VmFaultCounts> = vms
            .iter()
            .map(|&vm| {
                let (faults, handler_ns) = sampler.vm_faults(vm);
                VmFaultCounts {
                    vm,
                    vcpus: sampler.vcpu_threads(vm),
                    faults,
                    handler_ns,
                }
            })
            .collect();
        self.begin_round_with(&counts);
    }

    /// `begin_round` on the sampler's counters, read.
    fn begin_round_with(&mut self, counts: &[VmFaultCounts]) {
        let now = Instant::now();
        let dt_ns = (now - self.last).as_nanos() as f64;
        self.last = now;
        for &VmFaultCounts {
            vm,
            vcpus,
            faults,
            handler_ns,
        } in counts
        {
            let vcpus = vcpus.max(1) as f64;
            let full = self.overhead;
            let b = self.buckets.entry(vm).or_insert_with(|| Bucket {
                // One epoch's allowance to start with.
                tokens_ns: full * self.epoch.as_nanos() as f64 * vcpus,
                overhead: full,
                report: VmSamplingCost {
                    vm,
                    ..VmSamplingCost::default()
                },
                ..Bucket::default()
            });
            let ceiling = b.overhead * self.epoch.as_nanos() as f64 * vcpus;
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
            b.tokens_ns = (b.tokens_ns + b.overhead * dt_ns * vcpus - cost).min(ceiling);
        }
    }

    /// The end of an epoch for VM `vm`: a settled VM's allowance halves,
    /// down to the settled floor; an unsettled one's is the cap again;
    /// `None` (no verdict) keeps it.
    pub fn end_epoch(&mut self, vm: VmId, settled: Option<bool>) {
        let Some(b) = self.buckets.get_mut(&vm) else {
            return;
        };
        b.overhead = match settled {
            Some(true) => (b.overhead / 2.0).max(self.settled_overhead),
            Some(false) => self.overhead,
            None => b.overhead,
        };
        b.report.epochs += 1;
        b.report.settled_epochs += (settled == Some(true)) as u64;
    }

    /// Pages of VM `vm` zapped in the last epoch and not touched yet.
    pub fn outstanding(&self, vm: VmId) -> u64 {
        self.buckets.get(&vm).map_or(0, Bucket::outstanding)
    }

    /// How many of the `asked` pages VM `vm` may zap this round.
    pub fn allow(&mut self, vm: VmId, asked: u64) -> u64 {
        let zap_ns = if self.busy() {
            self.zap_ns_per_page
        } else {
            0.0
        };
        let Some(b) = self.buckets.get_mut(&vm) else {
            return asked;
        };
        let free = b.tokens_ns - b.outstanding() as f64 * self.fault_cost_ns;
        let per_page = self.fault_cost_ns + zap_ns;
        let affordable = if free <= 0.0 {
            0
        } else {
            (free / per_page).floor() as u64
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

    /// Whether no host CPU is idle (looked at now and then).
    fn busy(&mut self) -> bool {
        self.load.busy(ThreadCpu::clock().as_secs_f64() * 1e3)
    }

    /// Records how many pages VM `vm` really zapped this round, and the
    /// monitor's CPU time choosing and zapping them, charged while no host
    /// CPU is idle.
    pub fn zapped(&mut self, vm: VmId, pages: u64, cpu: Duration) {
        let cpu_ns = cpu.as_nanos() as f64;
        let charged_ns = if self.busy() { cpu_ns } else { 0.0 };
        if pages > 0 {
            // A mean over the last rounds: one slow round (a page fault
            // on the monitor's side, a preemption) does not swing it.
            let per_page = cpu_ns / pages as f64;
            self.zap_ns_per_page = if self.zap_ns_per_page == 0.0 {
                per_page
            } else {
                0.9 * self.zap_ns_per_page + 0.1 * per_page
            };
        }
        if let Some(b) = self.buckets.get_mut(&vm) {
            if let Some(round) = b.window.back_mut() {
                round.0 += pages;
            }
            b.tokens_ns -= charged_ns;
            b.report.zapped += pages;
            b.report.charged_ms += charged_ns / 1e6;
            b.report.zap_ms += cpu_ns / 1e6;
            b.report.zap_charged_ms += charged_ns / 1e6;
        }
    }

    /// Every VM's figures so far.
    pub fn report(&self) -> Vec<VmSamplingCost> {
        self.buckets
            .values()
            .map(|b| VmSamplingCost {
                overhead_now: b.overhead,
                ..b.report.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(faults: u64) -> [VmFaultCounts; 1] {
        [VmFaultCounts {
            vm: 0,
            vcpus: 1,
            faults,
            handler_ns: 0,
        }]
    }

    #[test]
    fn zapping_is_charged_and_makes_each_page_dearer() {
        // 2 % of a 1 s epoch of one vCPU: 20 ms; 100 us per fault.
        let mut cap = SamplingCap::new(0.02, 0.02, 100.0, Duration::from_secs(1), 1);
        cap.load.assume_busy();
        cap.begin_round_with(&counts(0));
        assert_eq!(cap.allow(0, 1000), 200, "20 ms at 100 us per fault");
        // The 200 pages cost 10 ms of monitor CPU to zap (50 us a page);
        // their faults, not yet seen, are still owed.
        cap.zapped(0, 200, Duration::from_millis(10));
        let r = &cap.report()[0];
        assert_eq!((r.zapped, r.faults), (200, 0));
        assert!((r.zap_ms - 10.0).abs() < 1e-9 && (r.charged_ms - 10.0).abs() < 1e-9);
        // The next round: the faults arrive (20 ms), on top of the zapping
        // (10 ms); the bucket is 10 ms short, so nothing is zapped.
        cap.begin_round_with(&counts(200));
        assert_eq!(cap.allow(0, 1000), 0);
        let r = &cap.report()[0];
        assert!((r.charged_ms - 30.0).abs() < 0.01, "{r:?}");
        assert_eq!(
            (r.rounds, r.capped_rounds),
            (2, 2),
            "both rounds asked for more"
        );
    }

    #[test]
    fn a_page_costs_its_fault_and_its_zap() {
        let mut cap = SamplingCap::new(0.02, 0.02, 100.0, Duration::from_secs(1), 1);
        cap.load.assume_busy();
        cap.begin_round_with(&counts(0));
        // Learn a zap cost of 100 us a page from a free round (0 pages
        // allowed are not zapped, but one page is).
        assert_eq!(cap.allow(0, 1), 1);
        cap.zapped(0, 1, Duration::from_micros(100));
        // Tokens left: 20 ms - 0.1 ms (zap) - 0.1 ms (its fault, owed):
        // at 200 us a page (fault and zap), 99 more pages.
        assert_eq!(cap.allow(0, 1000), 99);
    }

    #[test]
    fn zapping_on_a_host_with_an_idle_cpu_is_reported_not_charged() {
        // Not busy until the first look at /proc/stat, 200 ms away.
        let mut cap = SamplingCap::new(0.02, 0.02, 100.0, Duration::from_secs(1), 1);
        cap.begin_round_with(&counts(0));
        assert_eq!(cap.allow(0, 1000), 200);
        cap.zapped(0, 200, Duration::from_millis(10));
        let r = &cap.report()[0];
        assert!((r.zap_ms - 10.0).abs() < 1e-9, "{r:?}");
        assert_eq!((r.zap_charged_ms, r.charged_ms), (0.0, 0.0));
    }

    #[test]
    fn a_settled_vm_backs_off_to_the_floor_and_comes_back_at_once() {
        // 2 % of 1 s of one vCPU is 20 ms: 200 faults at 100 us; the
        // settled floor, 0.5 %, is 50.
        let mut cap = SamplingCap::new(0.02, 0.005, 100.0, Duration::from_secs(1), 1);
        cap.begin_round_with(&counts(0));
        assert_eq!(cap.allow(0, 1000), 200);
        cap.zapped(0, 0, Duration::ZERO);
        // Settled twice: 1 %, then 0.5 %; a third time stays at the floor.
        for want in [0.01, 0.005, 0.005] {
            cap.end_epoch(0, Some(true));
            assert_eq!(cap.report()[0].overhead_now, want);
        }
        // The bucket is cut to the floor's ceiling at the next round.
        cap.begin_round_with(&counts(0));
        assert_eq!(cap.allow(0, 1000), 50, "5 ms at 100 us per fault");
        // Samples turned remote: the whole cap again, from now on.
        cap.end_epoch(0, Some(false));
        let r = &cap.report()[0];
        assert_eq!((r.epochs, r.settled_epochs, r.overhead_now), (4, 3, 0.02));
        // No verdict (its zapped pages still to be touched) keeps it.
        cap.end_epoch(0, None);
        let r = &cap.report()[0];
        assert_eq!((r.epochs, r.settled_epochs, r.overhead_now), (5, 3, 0.02));
        // An unknown VM is ignored.
        cap.end_epoch(7, Some(true));
        assert_eq!(cap.report().len(), 1);
    }
}
